;; parent.wat -- an agent that supervises children of its own (world
;; `supervising-agent`), driven entirely by its messages.
;;
;; The state is an ASCII log of the exit notifications it was given (empty at first).
;; init(state, args)                 -> ok(args)
;; handle(state, message)            -> the state is never changed by handle:
;;   "spawn:<template>:<name>"       -> supervision.spawn(template, name, "");
;;                                      reply: the child's id, or "err:" + error
;;                                      (no second ':' means an empty name)
;;   "stop:<child-id>"               -> supervision.stop(child-id);
;;                                      reply: "ok", or "err:" + error
;;   "remove:<child-id>"             -> supervision.remove(child-id);
;;                                      reply: "ok", or "err:" + error
;;   "children"                      -> supervision.children(); reply: the ids
;;                                      joined with "," ("" when there are none)
;;   "state"                         -> reply: the current state
;;   anything else                   -> reply: "?"
;; child-exit(state, child, reason)  -> ok(state + child + "=" + reason + "\n"),
;;                                      one line per exit notification
;;
;; It imports only the supervision interface (the runtime interface is left
;; out on purpose: importing it is optional).
;;
;; Exists to test the supervision capability end to end: spawn, stop and list
;; through real host requests, the exit notifications delivered to the parent,
;; and every refusal coming back to the guest as an `err` it can report.
(component
  (type $outcome (record (field "state" string) (field "reply" (option string))))
  (import "theater:agent/supervision@0.1.0" (instance $sup
    (export "spawn" (func (param "template" string) (param "name" string) (param "args" string)
                          (result (result string (error string)))))
    (export "stop" (func (param "child" string) (result (result (error string)))))
    (export "children" (func (result (list string))))
    (export "remove" (func (param "child" string) (result (result (error string)))))))
  ;; ---------------------------------------------------------------------------
  ;; Linear memory and a bump allocator, in a core module of their own so that
  ;; they exist before the host functions are lowered (lowering a function that
  ;; takes or returns strings needs the memory and `realloc`).
  ;;
  ;; Layout: 0..1023 is static (result area at 16, constants from 64, the
  ;; return area of the imported functions at 256); the heap starts at 1024.
  ;; `realloc` grows memory as needed. `post` is the post-return function of
  ;; every export: once the host has copied a call's results out, everything
  ;; that call allocated is garbage, so the heap is reset to 1024 and memory
  ;; use does not creep from call to call.
  ;; ---------------------------------------------------------------------------
  (core module $Mem
    (memory (export "mem") 1)
    (global $bump (export "bump") (mut i32) (i32.const 1024))
    ;; realloc(old_ptr, old_size, align, new_size) -> ptr
    (func (export "realloc")
          (param $old i32) (param $old_size i32) (param $align i32) (param $size i32)
          (result i32)
      (local $ptr i32) (local $end i64) (local $have i64)
      (local.set $ptr
        (i32.and (i32.add (global.get $bump) (i32.sub (local.get $align) (i32.const 1)))
                 (i32.sub (i32.const 0) (local.get $align))))
      (local.set $end
        (i64.add (i64.extend_i32_u (local.get $ptr)) (i64.extend_i32_u (local.get $size))))
      ;; never let the bump pointer wrap past 4 GiB
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
      ;; a true realloc keeps the old contents (up to the smaller size)
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
  ;; Every import takes or returns strings: lowering each needs the memory, and
  ;; `realloc` for what the host writes back (an id, an error, a list).
  (core func $spawn (canon lower (func $sup "spawn")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $stop (canon lower (func $sup "stop")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $children (canon lower (func $sup "children")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $remove (canon lower (func $sup "remove")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "env" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    ;; spawn(template ptr/len, name ptr/len, args ptr/len, return area):
    ;; result<string, string> at the return area (disc +0, ptr +4, len +8)
    (import "sup" "spawn" (func $spawn (param i32 i32 i32 i32 i32 i32 i32)))
    ;; stop(child ptr/len, return area): result<_, string> (disc +0, error ptr +4, len +8)
    (import "sup" "stop" (func $stop (param i32 i32 i32)))
    ;; children(return area): list<string> (ptr +0, count +4) of (ptr, len) pairs
    (import "sup" "children" (func $children (param i32)))
    ;; remove(child ptr/len, return area): result<_, string>, as stop
    (import "sup" "remove" (func $remove (param i32 i32 i32)))
    (data (i32.const 64) "spawn:")
    (data (i32.const 72) "stop:")
    (data (i32.const 80) "children")
    (data (i32.const 96) "state")
    (data (i32.const 104) "err:")
    (data (i32.const 112) "ok")
    (data (i32.const 116) "?")
    (data (i32.const 120) "=")
    (data (i32.const 121) "\n")
    (data (i32.const 122) ",")
    (data (i32.const 128) "remove:")

    ;; the first `n` bytes at `a` and at `b` are equal
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

    ;; the message (p, l) is exactly the constant (c, n)
    (func $is (param $p i32) (param $l i32) (param $c i32) (param $n i32) (result i32)
      (if (i32.ne (local.get $l) (local.get $n)) (then (return (i32.const 0))))
      (call $same (local.get $p) (local.get $c) (local.get $n)))

    ;; the message (p, l) starts with the constant (c, n)
    (func $starts (param $p i32) (param $l i32) (param $c i32) (param $n i32) (result i32)
      (if (i32.lt_u (local.get $l) (local.get $n)) (then (return (i32.const 0))))
      (call $same (local.get $p) (local.get $c) (local.get $n)))

    ;; copy n bytes from src to dst; returns dst + n (where the next piece goes)
    (func $put (param $dst i32) (param $src i32) (param $n i32) (result i32)
      (memory.copy (local.get $dst) (local.get $src) (local.get $n))
      (i32.add (local.get $dst) (local.get $n)))

    ;; a fresh buffer of n bytes
    (func $alloc (param $n i32) (result i32)
      (call $realloc (i32.const 0) (i32.const 0) (i32.const 1) (local.get $n)))

    ;; ok({state: (sp, sl), reply: some((rp, rl))}) in the result area at 16
    (func $reply (param $sp i32) (param $sl i32) (param $rp i32) (param $rl i32) (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $sp))
      (i32.store (i32.const 24) (local.get $sl))
      (i32.store8 (i32.const 28) (i32.const 1))
      (i32.store (i32.const 32) (local.get $rp))
      (i32.store (i32.const 36) (local.get $rl))
      (i32.const 16))

    ;; reply "err:" + the error string whose (ptr, len) is at 260/264
    (func $reply_err (param $sp i32) (param $sl i32) (result i32)
      (local $buf i32) (local $el i32)
      (local.set $el (i32.load (i32.const 264)))
      (local.set $buf (call $alloc (i32.add (local.get $el) (i32.const 4))))
      (drop (call $put
        (call $put (local.get $buf) (i32.const 104) (i32.const 4))
        (i32.load (i32.const 260)) (local.get $el)))
      (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (i32.add (local.get $el) (i32.const 4))))

    ;; init -> ok(args)
    (func (export "init") (param $sp i32) (param $sl i32) (param $ap i32) (param $al i32)
          (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $ap))
      (i32.store (i32.const 24) (local.get $al))
      (i32.const 16))

    (func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32)
          (result i32)
      (local $tp i32) (local $tl i32) (local $np i32) (local $nl i32) (local $i i32)
      (local $list i32) (local $count i32) (local $total i32) (local $buf i32) (local $at i32)
      ;; "spawn:<template>:<name>"
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 64) (i32.const 6))
        (then
          (local.set $tp (i32.add (local.get $mp) (i32.const 6)))
          (local.set $i (i32.const 6))
          ;; the template runs up to the next ':' (or to the end: then the name is empty)
          (block $found
            (loop $scan
              (br_if $found (i32.ge_u (local.get $i) (local.get $ml)))
              (br_if $found
                (i32.eq (i32.load8_u (i32.add (local.get $mp) (local.get $i))) (i32.const 58)))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br $scan)))
          (local.set $tl (i32.sub (local.get $i) (i32.const 6)))
          (if (i32.lt_u (local.get $i) (local.get $ml))
            (then
              (local.set $np (i32.add (i32.add (local.get $mp) (local.get $i)) (i32.const 1)))
              (local.set $nl (i32.sub (i32.sub (local.get $ml) (local.get $i)) (i32.const 1))))
            (else
              (local.set $np (i32.add (local.get $mp) (local.get $ml)))
              (local.set $nl (i32.const 0))))
          (call $spawn (local.get $tp) (local.get $tl) (local.get $np) (local.get $nl)
                       (i32.const 0) (i32.const 0) (i32.const 256))
          (if (i32.load8_u (i32.const 256))
            (then (return (call $reply_err (local.get $sp) (local.get $sl)))))
          (return (call $reply (local.get $sp) (local.get $sl)
                               (i32.load (i32.const 260)) (i32.load (i32.const 264))))))
      ;; "stop:<child-id>"
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 72) (i32.const 5))
        (then
          (call $stop (i32.add (local.get $mp) (i32.const 5)) (i32.sub (local.get $ml) (i32.const 5))
                      (i32.const 256))
          (if (i32.load8_u (i32.const 256))
            (then (return (call $reply_err (local.get $sp) (local.get $sl)))))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 112) (i32.const 2)))))
      ;; "remove:<child-id>"
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 128) (i32.const 7))
        (then
          (call $remove (i32.add (local.get $mp) (i32.const 7)) (i32.sub (local.get $ml) (i32.const 7))
                        (i32.const 256))
          (if (i32.load8_u (i32.const 256))
            (then (return (call $reply_err (local.get $sp) (local.get $sl)))))
          (return (call $reply (local.get $sp) (local.get $sl) (i32.const 112) (i32.const 2)))))
      ;; "children" -> the ids joined with ","
      (if (call $is (local.get $mp) (local.get $ml) (i32.const 80) (i32.const 8))
        (then
          (call $children (i32.const 256))
          (local.set $list (i32.load (i32.const 256)))
          (local.set $count (i32.load (i32.const 260)))
          (if (i32.eqz (local.get $count))
            (then (return (call $reply (local.get $sp) (local.get $sl) (i32.const 0) (i32.const 0)))))
          ;; total = sum of the lengths + one ',' between each two
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
              (then (local.set $at (call $put (local.get $at) (i32.const 122) (i32.const 1)))))
            (local.set $at
              (call $put (local.get $at)
                (i32.load (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 3))))
                (i32.load (i32.add (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 3)))
                                   (i32.const 4)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $join (i32.lt_u (local.get $i) (local.get $count))))
          (return (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total)))))
      ;; "state" -> the state itself
      (if (call $is (local.get $mp) (local.get $ml) (i32.const 96) (i32.const 5))
        (then (return (call $reply (local.get $sp) (local.get $sl) (local.get $sp) (local.get $sl)))))
      (call $reply (local.get $sp) (local.get $sl) (i32.const 116) (i32.const 1)))

    ;; child-exit -> ok(state + child + "=" + reason + "\n")
    (func (export "child-exit") (param $sp i32) (param $sl i32) (param $cp i32) (param $cl i32)
          (param $rp i32) (param $rl i32) (result i32)
      (local $total i32) (local $buf i32)
      (local.set $total
        (i32.add (i32.add (i32.add (local.get $sl) (local.get $cl)) (local.get $rl)) (i32.const 2)))
      (local.set $buf (call $alloc (local.get $total)))
      (drop
        (call $put
          (call $put
            (call $put
              (call $put
                (call $put (local.get $buf) (local.get $sp) (local.get $sl))
                (local.get $cp) (local.get $cl))
              (i32.const 120) (i32.const 1))
            (local.get $rp) (local.get $rl))
          (i32.const 121) (i32.const 1)))
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $buf))
      (i32.store (i32.const 24) (local.get $total))
      (i32.const 16)))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "sup" (instance
      (export "spawn" (func $spawn))
      (export "stop" (func $stop))
      (export "children" (func $children))
      (export "remove" (func $remove))))))
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
  (func (export "child-exit") (param "state" string) (param "child" string) (param "reason" string)
        (result (result string (error string)))
    (canon lift (core func $i "child-exit")
      (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))
      (post-return (core func $mem "post"))))
)
