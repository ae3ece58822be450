;; keeper.wat -- an agent that keeps data in its key-value store (the kv
;; capability), driven entirely by its messages. The state is never changed.
;;   "get:<key>"                    -> reply "some:<value>" or "none"
;;   "set:<key>:<value>"            -> reply "ok" or "err:<error>"
;;   "set-then-trap:<key>:<value>"  -> kv.set, then a trap
;;   "set-then-fail:<key>:<value>"  -> kv.set, then err("failed on purpose")
;;   "fill:<n>:<value>"             -> kv.set of k0 .. k<n-1>, stopping at the first error;
;;                                     reply "ok" or "err:<i>:<error>"
;;   "del:<key>"                    -> reply "true" or "false"
;;   "list:<prefix>"                -> reply the keys joined with "," ("" when none)
;;   anything else                  -> reply "?"
;; (<key> runs up to the next ':'; the value is the rest.)
;;
;; Exists to test the kv capability end to end: writes that commit with their
;; call (or not), every quota, and keys that are only ever keys.
(component
  (type $outcome (record (field "state" string) (field "reply" (option string))))
  (import "theater:agent/kv@0.1.0" (instance $kv
    (export "get" (func (param "key" string) (result (option string))))
    (export "set" (func (param "key" string) (param "value" string) (result (result (error string)))))
    (export "delete" (func (param "key" string) (result bool)))
    (export "list-keys" (func (param "prefix" string) (result (list string))))))
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
  (core func $get (canon lower (func $kv "get")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $set (canon lower (func $kv "set")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $delete (canon lower (func $kv "delete")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $list (canon lower (func $kv "list-keys")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "env" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    ;; get(key ptr/len, return area): option<string> (disc +0, ptr +4, len +8)
    (import "kv" "get" (func $get (param i32 i32 i32)))
    ;; set(key ptr/len, value ptr/len, return area): result<_, string> (disc +0, ptr +4, len +8)
    (import "kv" "set" (func $set (param i32 i32 i32 i32 i32)))
    (import "kv" "delete" (func $delete (param i32 i32) (result i32)))
    ;; list-keys(prefix ptr/len, return area): list<string> (ptr +0, count +4) of (ptr, len) pairs
    (import "kv" "list-keys" (func $list (param i32 i32 i32)))
    (data (i32.const 64) "get:")
    (data (i32.const 72) "set:")
    (data (i32.const 80) "set-then-trap:")
    (data (i32.const 96) "set-then-fail:")
    (data (i32.const 112) "fill:")
    (data (i32.const 120) "del:")
    (data (i32.const 128) "list:")
    (data (i32.const 136) "err:")
    (data (i32.const 144) "ok")
    (data (i32.const 148) "none")
    (data (i32.const 152) "some:")
    (data (i32.const 160) "true")
    (data (i32.const 164) "false")
    (data (i32.const 200) "failed on purpose")
    (data (i32.const 192) "?")
    (data (i32.const 193) ",")
    (data (i32.const 194) ":")
    (data (i32.const 195) "k")
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

    ;; kv.set of "<key>:<value>" at (p, l); returns the result's disc (0: ok), the error at 260/264
    (func $set_one (param $p i32) (param $l i32) (result i32)
      (local $i i32)
      (local.set $i (call $colon (local.get $p) (local.get $l) (i32.const 0)))
      (call $set (local.get $p) (local.get $i)
                 (i32.add (i32.add (local.get $p) (local.get $i)) (i32.const 1))
                 (i32.sub (i32.sub (local.get $l) (local.get $i)) (i32.const 1))
                 (i32.const 256))
      (i32.load8_u (i32.const 256)))

    (func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32) (result i32)
      (local $i i32) (local $n i32) (local $k i32) (local $j i32) (local $list i32) (local $count i32)
      (local $total i32) (local $buf i32) (local $at i32) (local $vp i32) (local $vl i32)
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 64) (i32.const 4))
        (then
          (call $get (i32.add (local.get $mp) (i32.const 4)) (i32.sub (local.get $ml) (i32.const 4)) (i32.const 256))
          (if (i32.eqz (i32.load8_u (i32.const 256)))
            (then (return (call $reply (local.get $sp) (local.get $sl) (i32.const 148) (i32.const 4)))))
          (return (call $reply_with (local.get $sp) (local.get $sl) (i32.const 152) (i32.const 5) (i32.const 260)))))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 72) (i32.const 4))
        (then
          (if (call $set_one (i32.add (local.get $mp) (i32.const 4)) (i32.sub (local.get $ml) (i32.const 4)))
            (then (return (call $reply_with (local.get $sp) (local.get $sl) (i32.const 136) (i32.const 4)
                                            (i32.const 260)))))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 144) (i32.const 2)))))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 80) (i32.const 14))
        (then
          (drop (call $set_one (i32.add (local.get $mp) (i32.const 14)) (i32.sub (local.get $ml) (i32.const 14))))
          unreachable))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 96) (i32.const 14))
        (then
          (drop (call $set_one (i32.add (local.get $mp) (i32.const 14)) (i32.sub (local.get $ml) (i32.const 14))))
          (return (call $fail))))
      ;; "fill:<n>:<value>": keys "k<i>" built at 800
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 112) (i32.const 5))
        (then
          (local.set $i (call $colon (local.get $mp) (local.get $ml) (i32.const 5)))
          (local.set $n (call $number (i32.add (local.get $mp) (i32.const 5)) (i32.sub (local.get $i) (i32.const 5))))
          (local.set $vp (i32.add (i32.add (local.get $mp) (local.get $i)) (i32.const 1)))
          (local.set $vl (i32.sub (i32.sub (local.get $ml) (local.get $i)) (i32.const 1)))
          (i32.store8 (i32.const 800) (i32.const 107))
          (block $all
            (loop $again
              (br_if $all (i32.ge_u (local.get $k) (local.get $n)))
              (local.set $j (call $decimal (i32.const 801) (local.get $k)))
              (call $set (i32.const 800) (i32.sub (local.get $j) (i32.const 800))
                         (local.get $vp) (local.get $vl) (i32.const 256))
              (if (i32.load8_u (i32.const 256))
                (then
                  ;; "err:<k>:" + error; "<k>:" written at 840
                  (local.set $j (call $decimal (i32.const 840) (local.get $k)))
                  (i32.store8 (local.get $j) (i32.const 58))
                  (local.set $total (i32.add (i32.sub (local.get $j) (i32.const 835)) (i32.load (i32.const 264))))
                  (local.set $buf (call $alloc (local.get $total)))
                  (drop (call $put (call $put (call $put (local.get $buf) (i32.const 136) (i32.const 4))
                                              (i32.const 840) (i32.sub (i32.add (local.get $j) (i32.const 1)) (i32.const 840)))
                                   (i32.load (i32.const 260)) (i32.load (i32.const 264))))
                  (return (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total)))))
              (local.set $k (i32.add (local.get $k) (i32.const 1)))
              (br $again)))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 144) (i32.const 2)))))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 120) (i32.const 4))
        (then
          (if (call $delete (i32.add (local.get $mp) (i32.const 4)) (i32.sub (local.get $ml) (i32.const 4)))
            (then (return (call $reply (local.get $sp) (local.get $sl) (i32.const 160) (i32.const 4)))))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 164) (i32.const 5)))))
      ;; "list:<prefix>" -> the keys joined with ","
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 128) (i32.const 5))
        (then
          (call $list (i32.add (local.get $mp) (i32.const 5)) (i32.sub (local.get $ml) (i32.const 5)) (i32.const 256))
          (local.set $list (i32.load (i32.const 256)))
          (local.set $count (i32.load (i32.const 260)))
          (if (i32.eqz (local.get $count))
            (then (return (call $reply (local.get $sp) (local.get $sl) (i32.const 0) (i32.const 0)))))
          (local.set $total (i32.sub (local.get $count) (i32.const 1)))
          (local.set $i (i32.const 0))
          (loop $sum
            (local.set $total
              (i32.add (local.get $total)
                       (i32.load (i32.add (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 3)))
                                          (i32.const 4)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $sum (i32.lt_u (local.get $i) (local.get $count))))
          (local.set $buf (call $alloc (local.get $total)))
          (local.set $at (local.get $buf))
          (local.set $i (i32.const 0))
          (loop $join
            (if (local.get $i)
              (then (local.set $at (call $put (local.get $at) (i32.const 193) (i32.const 1)))))
            (local.set $at
              (call $put (local.get $at)
                (i32.load (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 3))))
                (i32.load (i32.add (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 3)))
                                   (i32.const 4)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $join (i32.lt_u (local.get $i) (local.get $count))))
          (return (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total)))))
      (call $reply (local.get $sp) (local.get $sl) (i32.const 192) (i32.const 1))))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "kv" (instance
      (export "get" (func $get))
      (export "set" (func $set))
      (export "delete" (func $delete))
      (export "list-keys" (func $list))))))
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
