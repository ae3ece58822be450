;; messenger.wat -- an agent that messages and calls other agents (world
;; `messaging-agent`), driven entirely by its messages.
;;
;; handle(state, message) and receive(state, sender, message) run one
;; dispatcher; handle's sender is "-":
;;   "send:<to>:<payload>"            -> messaging.send; reply "ok" or "err:<case>:<detail>"
;;   "sendn:<n>:<to>:<payload>"       -> n sends, stopping at the first error;
;;                                       reply "ok" or "err:<i>:<case>:<detail>" (i from 0)
;;   "send-then-trap:<to>:<payload>"  -> messaging.send, then a trap
;;   "big:<n>:<to>"                   -> messaging.send of n bytes of 'x' (a message larger than the
;;                                       one that asks for it); reply "ok" or "err:<case>:<detail>"
;;   "call:<ms>:<to>:<payload>"       -> messaging.call(to, payload, ms); reply
;;                                       "ok:<reply>", "none" or "err:<case>:<detail>"
;;   "trap" -> traps; "spin" -> loops until its deadline; "fail" -> err("failed on purpose")
;;   "state" -> reply: the state (unchanged)
;;   anything else -> state + sender + "=" + message + "\n"; reply "ack:" + message
;; (<to> runs up to the next ':'; the payload is the rest and may hold ':'.)
;; <case> is the call-error case's WIT name. The state is changed only by the last rule.
;; init(state, args): the state becomes args; if args is "call:<ms>:<to>:<payload>", that
;; call is made first (its reply dropped), so a start can be held by the agent it calls.
;;
;; Exists to test the messaging capability end to end: sends, calls, every
;; call-error case coming back to the guest, cycles, floods, and the sender's
;; id the supervisor hands to the receiver, and a start that waits on another agent.
(component
  (type $outcome (record (field "state" string) (field "reply" (option string))))
  (type $call-error (variant
    (case "unknown-address" string) (case "denied" string) (case "not-running" string)
    (case "mailbox-full" string) (case "too-large" string) (case "timeout" string)
    (case "target-crashed" string) (case "guest-error" string) (case "cycle" string)))
  (type $call-reply (record (field "reply" (option string))))
  (import "theater:agent/messaging@0.1.0" (instance $msg
    (export "call-error" (type $ce (eq $call-error)))
    (export "call-reply" (type $cr (eq $call-reply)))
    (export "send" (func (param "to" string) (param "message" string) (result (result (error $ce)))))
    (export "call" (func (param "to" string) (param "message" string) (param "timeout-ms" u32)
                         (result (result $cr (error $ce)))))))
  ;; Memory and a bump allocator, as in parent.wat: 0..1023 static, heap from 1024,
  ;; reset after every export by `post`.
  (core module $Mem
    (memory (export "mem") 1)
    (global $bump (export "bump") (mut i32) (i32.const 1024))
    (func (export "realloc")
          (param $old i32) (param $old_size i32) (param $align i32) (param $size i32)
          (result i32)
      (local $ptr i32) (local $end i64) (local $have i64)
      (local.set $ptr
        (i32.and (i32.add (global.get $bump) (i32.sub (local.get $align) (i32.const 1)))
                 (i32.sub (i32.const 0) (local.get $align))))
      (local.set $end
        (i64.add (i64.extend_i32_u (local.get $ptr)) (i64.extend_i32_u (local.get $size))))
      (if (i64.ge_u (local.get $end) (i64.const 0xFFFF0000)) (then unreachable))
      (local.set $have (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
      (if (i64.gt_u (local.get $end) (local.get $have))
        (then
          (if (i32.eq
                (memory.grow
                  (i32.wrap_i64
                    (i64.shr_u
                      (i64.add (i64.sub (local.get $end) (local.get $have)) (i64.const 65535))
                      (i64.const 16))))
                (i32.const -1))
            (then unreachable))))
      (if (local.get $old_size)
        (then
          (memory.copy (local.get $ptr) (local.get $old)
            (select (local.get $old_size) (local.get $size)
                    (i32.lt_u (local.get $old_size) (local.get $size))))))
      (global.set $bump (i32.wrap_i64 (local.get $end)))
      (local.get $ptr))
    (func (export "post") (param i32)
      (global.set $bump (i32.const 1024))))
  (core instance $mem (instantiate $Mem))
  (core func $send (canon lower (func $msg "send")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $call (canon lower (func $msg "call")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "env" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    ;; send(to ptr/len, message ptr/len, return area): result<_, call-error>
    ;;   at the return area: disc +0; the error's case +4, its string ptr +8, len +12
    (import "msg" "send" (func $send (param i32 i32 i32 i32 i32)))
    ;; call(to ptr/len, message ptr/len, timeout, return area): result<call-reply, call-error>
    ;;   disc +0; ok: the reply's option disc +4, ptr +8, len +12; err: case +4, ptr +8, len +12
    (import "msg" "call" (func $call (param i32 i32 i32 i32 i32 i32)))
    (data (i32.const 64) "send:")
    (data (i32.const 72) "sendn:")
    (data (i32.const 80) "send-then-trap:")
    (data (i32.const 96) "call:")
    (data (i32.const 104) "trap")
    (data (i32.const 112) "spin")
    (data (i32.const 120) "fail")
    (data (i32.const 128) "state")
    (data (i32.const 136) "err:")
    (data (i32.const 144) "ok")
    (data (i32.const 148) "none")
    (data (i32.const 152) "ack:")
    (data (i32.const 160) "ok:")
    (data (i32.const 168) "failed on purpose")
    (data (i32.const 192) "=")
    (data (i32.const 193) "\n")
    (data (i32.const 194) ":")
    (data (i32.const 195) "-")
    (data (i32.const 900) "big:")
    ;; the call-error cases' names, and at 700 a table of (offset, length) by case
    (data (i32.const 600) "unknown-addressdeniednot-runningmailbox-fulltoo-largetimeouttarget-crashedguest-errorcycle")
    (data (i32.const 700)
      "\58\02\00\00\0f\00\00\00" "\67\02\00\00\06\00\00\00" "\6d\02\00\00\0b\00\00\00"
      "\78\02\00\00\0c\00\00\00" "\84\02\00\00\09\00\00\00" "\8d\02\00\00\07\00\00\00"
      "\94\02\00\00\0e\00\00\00" "\a2\02\00\00\0b\00\00\00" "\ad\02\00\00\05\00\00\00")

    (func $same (param $a i32) (param $b i32) (param $n i32) (result i32)
      (local $i i32)
      (block $differ
        (loop $next
          (if (i32.ge_u (local.get $i) (local.get $n)) (then (return (i32.const 1))))
          (br_if $differ
            (i32.ne (i32.load8_u (i32.add (local.get $a) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $b) (local.get $i)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      (i32.const 0))
    (func $is (param $p i32) (param $l i32) (param $c i32) (param $n i32) (result i32)
      (if (i32.ne (local.get $l) (local.get $n)) (then (return (i32.const 0))))
      (call $same (local.get $p) (local.get $c) (local.get $n)))
    (func $starts (param $p i32) (param $l i32) (param $c i32) (param $n i32) (result i32)
      (if (i32.lt_u (local.get $l) (local.get $n)) (then (return (i32.const 0))))
      (call $same (local.get $p) (local.get $c) (local.get $n)))
    (func $put (param $dst i32) (param $src i32) (param $n i32) (result i32)
      (memory.copy (local.get $dst) (local.get $src) (local.get $n))
      (i32.add (local.get $dst) (local.get $n)))
    (func $alloc (param $n i32) (result i32)
      (call $realloc (i32.const 0) (i32.const 0) (i32.const 1) (local.get $n)))
    ;; the index of the first ':' in (p, l) at or after i, or l
    (func $colon (param $p i32) (param $l i32) (param $i i32) (result i32)
      (block $found
        (loop $scan
          (br_if $found (i32.ge_u (local.get $i) (local.get $l)))
          (br_if $found (i32.eq (i32.load8_u (i32.add (local.get $p) (local.get $i))) (i32.const 58)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $scan)))
      (local.get $i))
    ;; the decimal number in (p, l) (digits only; anything else counts as 0)
    (func $number (param $p i32) (param $l i32) (result i32)
      (local $i i32) (local $n i32) (local $d i32)
      (block $done
        (loop $next
          (br_if $done (i32.ge_u (local.get $i) (local.get $l)))
          (local.set $d (i32.sub (i32.load8_u (i32.add (local.get $p) (local.get $i))) (i32.const 48)))
          (if (i32.gt_u (local.get $d) (i32.const 9)) (then (local.set $d (i32.const 0))))
          (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10)) (local.get $d)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      (local.get $n))
    ;; n in decimal at dst; returns the end
    (func $decimal (param $dst i32) (param $n i32) (result i32)
      (local $digits i32) (local $m i32) (local $end i32)
      (local.set $m (local.get $n))
      (local.set $digits (i32.const 1))
      (block $counted
        (loop $count
          (local.set $m (i32.div_u (local.get $m) (i32.const 10)))
          (br_if $counted (i32.eqz (local.get $m)))
          (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
          (br $count)))
      (local.set $end (i32.add (local.get $dst) (local.get $digits)))
      (local.set $m (local.get $end))
      (loop $write
        (local.set $m (i32.sub (local.get $m) (i32.const 1)))
        (i32.store8 (local.get $m) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
        (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
        (br_if $write (i32.gt_u (local.get $m) (local.get $dst))))
      (local.get $end))

    ;; ok({state: (sp, sl), reply: some((rp, rl))}) in the result area at 16
    (func $reply (param $sp i32) (param $sl i32) (param $rp i32) (param $rl i32) (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $sp))
      (i32.store (i32.const 24) (local.get $sl))
      (i32.store8 (i32.const 28) (i32.const 1))
      (i32.store (i32.const 32) (local.get $rp))
      (i32.store (i32.const 36) (local.get $rl))
      (i32.const 16))
    ;; reply "err:" + (xp, xl) + <case> + ":" + <detail>, from the error at the return area 256
    (func $reply_err (param $sp i32) (param $sl i32) (param $xp i32) (param $xl i32) (result i32)
      (local $case i32) (local $cp i32) (local $cl i32) (local $dp i32) (local $dl i32)
      (local $total i32) (local $buf i32)
      (local.set $case (i32.load8_u (i32.const 260)))
      (local.set $cp (i32.load (i32.add (i32.const 700) (i32.shl (local.get $case) (i32.const 3)))))
      (local.set $cl (i32.load (i32.add (i32.const 704) (i32.shl (local.get $case) (i32.const 3)))))
      (local.set $dp (i32.load (i32.const 264)))
      (local.set $dl (i32.load (i32.const 268)))
      (local.set $total (i32.add (i32.add (i32.add (local.get $xl) (local.get $cl)) (local.get $dl))
                                 (i32.const 5)))
      (local.set $buf (call $alloc (local.get $total)))
      (drop
        (call $put
          (call $put
            (call $put
              (call $put (call $put (local.get $buf) (i32.const 136) (i32.const 4))
                         (local.get $xp) (local.get $xl))
              (local.get $cp) (local.get $cl))
            (i32.const 194) (i32.const 1))
          (local.get $dp) (local.get $dl)))
      (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total)))

    ;; "<to>:<payload>" at (p, l) -> to (p, i) and the payload after the ':'
    ;; into the globals-free return: sends it, the error (if any) at 256
    (func $send_one (param $p i32) (param $l i32) (result i32)
      (local $i i32)
      (local.set $i (call $colon (local.get $p) (local.get $l) (i32.const 0)))
      (call $send (local.get $p) (local.get $i)
                  (i32.add (i32.add (local.get $p) (local.get $i)) (i32.const 1))
                  (i32.sub (i32.sub (local.get $l) (local.get $i)) (i32.const 1))
                  (i32.const 256))
      (i32.load8_u (i32.const 256)))

    (func $run (param $sp i32) (param $sl i32) (param $fp i32) (param $fl i32) (param $mp i32) (param $ml i32)
          (result i32)
      (local $i i32) (local $j i32) (local $n i32) (local $k i32) (local $buf i32) (local $total i32)
      ;; "big:<n>:<to>": send n bytes of 'x' to <to>
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 900) (i32.const 4))
        (then
          (local.set $i (call $colon (local.get $mp) (local.get $ml) (i32.const 4)))
          (local.set $n (call $number (i32.add (local.get $mp) (i32.const 4)) (i32.sub (local.get $i) (i32.const 4))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (local.set $buf (call $alloc (local.get $n)))
          (memory.fill (local.get $buf) (i32.const 120) (local.get $n))
          (call $send (i32.add (local.get $mp) (local.get $i)) (i32.sub (local.get $ml) (local.get $i))
                      (local.get $buf) (local.get $n) (i32.const 256))
          (if (i32.load8_u (i32.const 256))
            (then (return (call $reply_err (local.get $sp) (local.get $sl) (i32.const 0) (i32.const 0)))))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 144) (i32.const 2)))))
      ;; "sendn:<n>:<to>:<payload>"
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 72) (i32.const 6))
        (then
          (local.set $i (call $colon (local.get $mp) (local.get $ml) (i32.const 6)))
          (local.set $n (call $number (i32.add (local.get $mp) (i32.const 6)) (i32.sub (local.get $i) (i32.const 6))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (local.set $k (i32.const 0))
          (block $all
            (loop $again
              (br_if $all (i32.ge_u (local.get $k) (local.get $n)))
              (if (call $send_one (i32.add (local.get $mp) (local.get $i)) (i32.sub (local.get $ml) (local.get $i)))
                (then
                  ;; "<k>:" at 800, then the error
                  (local.set $j (call $decimal (i32.const 800) (local.get $k)))
                  (i32.store8 (local.get $j) (i32.const 58))
                  (return (call $reply_err (local.get $sp) (local.get $sl) (i32.const 800)
                                           (i32.sub (i32.add (local.get $j) (i32.const 1)) (i32.const 800))))))
              (local.set $k (i32.add (local.get $k) (i32.const 1)))
              (br $again)))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 144) (i32.const 2)))))
      ;; "send-then-trap:<to>:<payload>"
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 80) (i32.const 15))
        (then
          (drop (call $send_one (i32.add (local.get $mp) (i32.const 15)) (i32.sub (local.get $ml) (i32.const 15))))
          unreachable))
      ;; "send:<to>:<payload>"
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 64) (i32.const 5))
        (then
          (if (call $send_one (i32.add (local.get $mp) (i32.const 5)) (i32.sub (local.get $ml) (i32.const 5)))
            (then (return (call $reply_err (local.get $sp) (local.get $sl) (i32.const 0) (i32.const 0)))))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 144) (i32.const 2)))))
      ;; "call:<ms>:<to>:<payload>"
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 96) (i32.const 5))
        (then
          (local.set $i (call $colon (local.get $mp) (local.get $ml) (i32.const 5)))
          (local.set $n (call $number (i32.add (local.get $mp) (i32.const 5)) (i32.sub (local.get $i) (i32.const 5))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (local.set $j (call $colon (local.get $mp) (local.get $ml) (local.get $i)))
          (call $call (i32.add (local.get $mp) (local.get $i)) (i32.sub (local.get $j) (local.get $i))
                      (i32.add (i32.add (local.get $mp) (local.get $j)) (i32.const 1))
                      (i32.sub (i32.sub (local.get $ml) (local.get $j)) (i32.const 1))
                      (local.get $n) (i32.const 256))
          (if (i32.load8_u (i32.const 256))
            (then (return (call $reply_err (local.get $sp) (local.get $sl) (i32.const 0) (i32.const 0)))))
          (if (i32.eqz (i32.load8_u (i32.const 260)))
            (then (return (call $reply (local.get $sp) (local.get $sl) (i32.const 148) (i32.const 4)))))
          (local.set $total (i32.add (i32.load (i32.const 268)) (i32.const 3)))
          (local.set $buf (call $alloc (local.get $total)))
          (drop (call $put (call $put (local.get $buf) (i32.const 160) (i32.const 3))
                           (i32.load (i32.const 264)) (i32.load (i32.const 268))))
          (return (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total)))))
      (if (call $is (local.get $mp) (local.get $ml) (i32.const 104) (i32.const 4))
        (then unreachable))
      (if (call $is (local.get $mp) (local.get $ml) (i32.const 112) (i32.const 4))
        (then (loop $forever (br $forever))))
      (if (call $is (local.get $mp) (local.get $ml) (i32.const 120) (i32.const 4))
        (then
          (i32.store8 (i32.const 16) (i32.const 1))
          (i32.store (i32.const 20) (i32.const 168))
          (i32.store (i32.const 24) (i32.const 17))
          (return (i32.const 16))))
      (if (call $is (local.get $mp) (local.get $ml) (i32.const 128) (i32.const 5))
        (then (return (call $reply (local.get $sp) (local.get $sl) (local.get $sp) (local.get $sl)))))
      ;; anything else: remember who said what; reply "ack:" + message
      (local.set $total (i32.add (i32.add (i32.add (local.get $sl) (local.get $fl)) (local.get $ml)) (i32.const 2)))
      (local.set $buf (call $alloc (local.get $total)))
      (drop
        (call $put
          (call $put
            (call $put
              (call $put (call $put (local.get $buf) (local.get $sp) (local.get $sl)) (local.get $fp) (local.get $fl))
              (i32.const 192) (i32.const 1))
            (local.get $mp) (local.get $ml))
          (i32.const 193) (i32.const 1)))
      (local.set $i (call $alloc (i32.add (local.get $ml) (i32.const 4))))
      (drop (call $put (call $put (local.get $i) (i32.const 152) (i32.const 4)) (local.get $mp) (local.get $ml)))
      (call $reply (local.get $buf) (local.get $total) (local.get $i) (i32.add (local.get $ml) (i32.const 4))))

    (func (export "init") (param $sp i32) (param $sl i32) (param $ap i32) (param $al i32) (result i32)
      ;; init args "call:<ms>:<to>:<payload>": that call is made during init, and its reply dropped
      (if (call $starts (local.get $ap) (local.get $al) (i32.const 96) (i32.const 5))
        (then (drop (call $run (local.get $sp) (local.get $sl) (i32.const 195) (i32.const 1)
                               (local.get $ap) (local.get $al)))))
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $ap))
      (i32.store (i32.const 24) (local.get $al))
      (i32.const 16))
    (func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32) (result i32)
      (call $run (local.get $sp) (local.get $sl) (i32.const 195) (i32.const 1) (local.get $mp) (local.get $ml)))
    (func (export "receive") (param $sp i32) (param $sl i32) (param $fp i32) (param $fl i32)
          (param $mp i32) (param $ml i32) (result i32)
      (call $run (local.get $sp) (local.get $sl) (local.get $fp) (local.get $fl) (local.get $mp) (local.get $ml))))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "msg" (instance
      (export "send" (func $send))
      (export "call" (func $call))))))
  (export $o "outcome" (type $outcome))
  (func (export "init") (param "state" string) (param "args" string)
        (result (result string (error string)))
    (canon lift (core func $i "init")
      (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))
      (post-return (core func $mem "post"))))
  (func (export "handle") (param "state" string) (param "message" string)
        (result (result $o (error string)))
    (canon lift (core func $i "handle")
      (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))
      (post-return (core func $mem "post"))))
  (func (export "receive") (param "state" string) (param "sender" string) (param "message" string)
        (result (result $o (error string)))
    (canon lift (core func $i "receive")
      (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))
      (post-return (core func $mem "post"))))
)
