;; alarm.wat -- an agent that sets timers for itself (the timers capability),
;; driven entirely by its messages. A due timer's message comes back through handle.
;;   "after:<ms>:<payload>"            -> timers.after(ms, payload); reply "id:<id>" or "err:<error>"
;;   "after-then-trap:<ms>:<payload>"  -> timers.after, then a trap
;;   "bigafter:<n>"                    -> timers.after(600000, n bytes of 'x'); reply "ack" or "err:<error>"
;;   "cancel:<id>"                     -> reply "true" or "false"
;;   "state"                           -> reply: the state (unchanged)
;;   anything else                     -> state + message + "\n"; reply "ack"
;; Ids and delays are u64s in decimal.
;;
;; Exists to test the timers capability end to end: timers committed with
;; their call, delivered across restarts, cancelled, and bounded.
(component
  (type $outcome (record (field "state" string) (field "reply" (option string))))
  (import "theater:agent/timers@0.1.0" (instance $timers
    (export "after" (func (param "delay-ms" u64) (param "message" string) (result (result u64 (error string)))))
    (export "cancel" (func (param "id" u64) (result bool)))))
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
  (core func $after (canon lower (func $timers "after")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $cancel (canon lower (func $timers "cancel")))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "env" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    ;; after(delay, message ptr/len, return area): result<u64, string>
    ;;   disc +0; ok: the id (u64) +8; err: ptr +8, len +12
    (import "timers" "after" (func $after (param i64 i32 i32 i32)))
    (import "timers" "cancel" (func $cancel (param i64) (result i32)))
    (data (i32.const 64) "after:")
    (data (i32.const 72) "after-then-trap:")
    (data (i32.const 96) "cancel:")
    (data (i32.const 104) "state")
    (data (i32.const 112) "id:")
    (data (i32.const 120) "ack")
    (data (i32.const 136) "err:")
    (data (i32.const 160) "true")
    (data (i32.const 164) "false")
    (data (i32.const 193) "\n")
    (data (i32.const 200) "failed on purpose")
    (data (i32.const 900) "bigafter:")
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
    (func (export "init") (param $sp i32) (param $sl i32) (param $ap i32) (param $al i32) (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $ap))
      (i32.store (i32.const 24) (local.get $al))
      (i32.const 16))
    ;; reply (pp, pl) + the string whose (ptr, len) is at (at, at + 4)
    (func $reply_with (param $sp i32) (param $sl i32) (param $pp i32) (param $pl i32) (param $at i32) (result i32)
      (local $total i32) (local $buf i32)
      (local.set $total (i32.add (local.get $pl) (i32.load (i32.add (local.get $at) (i32.const 4)))))
      (local.set $buf (call $alloc (local.get $total)))
      (drop (call $put (call $put (local.get $buf) (local.get $pp) (local.get $pl))
                       (i32.load (local.get $at)) (i32.load (i32.add (local.get $at) (i32.const 4)))))
      (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total)))
    ;; err("failed on purpose")
    (func $fail (result i32)
      (i32.store8 (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (i32.const 200))
      (i32.store (i32.const 24) (i32.const 17))
      (i32.const 16))


    ;; the decimal u64 in (p, l)
    (func $number64 (param $p i32) (param $l i32) (result i64)
      (local $i i32) (local $n i64) (local $d i32)
      (block $done
        (loop $next
          (br_if $done (i32.ge_u (local.get $i) (local.get $l)))
          (local.set $d (i32.sub (i32.load8_u (i32.add (local.get $p) (local.get $i))) (i32.const 48)))
          (if (i32.gt_u (local.get $d) (i32.const 9)) (then (local.set $d (i32.const 0))))
          (local.set $n (i64.add (i64.mul (local.get $n) (i64.const 10)) (i64.extend_i32_u (local.get $d))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      (local.get $n))
    ;; n (u64) in decimal at dst; returns the end
    (func $decimal64 (param $dst i32) (param $n i64) (result i32)
      (local $digits i32) (local $m i64) (local $at i32) (local $end i32)
      (local.set $m (local.get $n))
      (local.set $digits (i32.const 1))
      (block $counted
        (loop $count
          (local.set $m (i64.div_u (local.get $m) (i64.const 10)))
          (br_if $counted (i64.eqz (local.get $m)))
          (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
          (br $count)))
      (local.set $end (i32.add (local.get $dst) (local.get $digits)))
      (local.set $at (local.get $end))
      (loop $write
        (local.set $at (i32.sub (local.get $at) (i32.const 1)))
        (i32.store8 (local.get $at)
          (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
        (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
        (br_if $write (i32.gt_u (local.get $at) (local.get $dst))))
      (local.get $end))
    ;; timers.after for "<ms>:<payload>" at (p, l); returns the result's disc
    (func $after_one (param $p i32) (param $l i32) (result i32)
      (local $i i32)
      (local.set $i (call $colon (local.get $p) (local.get $l) (i32.const 0)))
      (call $after (call $number64 (local.get $p) (local.get $i))
                   (i32.add (i32.add (local.get $p) (local.get $i)) (i32.const 1))
                   (i32.sub (i32.sub (local.get $l) (local.get $i)) (i32.const 1))
                   (i32.const 256))
      (i32.load8_u (i32.const 256)))

    (func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32) (result i32)
      (local $end i32) (local $total i32) (local $buf i32)
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 900) (i32.const 9))
        (then
          (local.set $total (call $number (i32.add (local.get $mp) (i32.const 9)) (i32.sub (local.get $ml) (i32.const 9))))
          (local.set $buf (call $alloc (local.get $total)))
          (memory.fill (local.get $buf) (i32.const 120) (local.get $total))
          (call $after (i64.const 600000) (local.get $buf) (local.get $total) (i32.const 256))
          (if (i32.load8_u (i32.const 256))
            (then (return (call $reply_with (local.get $sp) (local.get $sl) (i32.const 136) (i32.const 4)
                                            (i32.const 264)))))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 120) (i32.const 3)))))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 72) (i32.const 16))
        (then
          (drop (call $after_one (i32.add (local.get $mp) (i32.const 16)) (i32.sub (local.get $ml) (i32.const 16))))
          unreachable))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 64) (i32.const 6))
        (then
          (if (call $after_one (i32.add (local.get $mp) (i32.const 6)) (i32.sub (local.get $ml) (i32.const 6)))
            (then (return (call $reply_with (local.get $sp) (local.get $sl) (i32.const 136) (i32.const 4)
                                            (i32.const 264)))))
          ;; "id:" + the id, written at 800
          (drop (call $put (i32.const 800) (i32.const 112) (i32.const 3)))
          (local.set $end (call $decimal64 (i32.const 803) (i64.load (i32.const 264))))
          (local.set $total (i32.sub (local.get $end) (i32.const 800)))
          (local.set $buf (call $alloc (local.get $total)))
          (drop (call $put (local.get $buf) (i32.const 800) (local.get $total)))
          (return (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total)))))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 96) (i32.const 7))
        (then
          (if (call $cancel (call $number64 (i32.add (local.get $mp) (i32.const 7)) (i32.sub (local.get $ml) (i32.const 7))))
            (then (return (call $reply (local.get $sp) (local.get $sl) (i32.const 160) (i32.const 4)))))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 164) (i32.const 5)))))
      (if (call $is (local.get $mp) (local.get $ml) (i32.const 104) (i32.const 5))
        (then (return (call $reply (local.get $sp) (local.get $sl) (local.get $sp) (local.get $sl)))))
      ;; anything else: the state gains the message and a newline
      (local.set $total (i32.add (i32.add (local.get $sl) (local.get $ml)) (i32.const 1)))
      (local.set $buf (call $alloc (local.get $total)))
      (drop (call $put (call $put (call $put (local.get $buf) (local.get $sp) (local.get $sl))
                                  (local.get $mp) (local.get $ml))
                       (i32.const 193) (i32.const 1)))
      (call $reply (local.get $buf) (local.get $total) (i32.const 120) (i32.const 3))))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "timers" (instance
      (export "after" (func $after))
      (export "cancel" (func $cancel))))))
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
)
