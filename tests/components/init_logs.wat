;; init_logs.wat -- trap_on.wat, except that init logs and reads the clock.
;;
;; The state is an ASCII decimal number (empty state counts as 0).
;; init(state, args)      -> log(info, "init"); now(); then ok(args) if args is
;;                           non-empty, else ok("0")
;; handle(state, message) -> if message is exactly "trap": executes `unreachable`;
;;                           otherwise n = state + 1; ok({state: "n", reply: some("n")})
;;                           (a state that is not a decimal number gives
;;                           err("counter: state is not a decimal number"))
;; Imports runtime.log and runtime.now, called from init only.
;;
;; Exists to test a restart from the initial state: the log and host-call
;; records that init writes come before its init record, so they must link to
;; the state the new worker was given (the empty one), not the last committed
;; state.
(component
  (type $outcome (record (field "state" string) (field "reply" (option string))))
  (import "theater:agent/runtime@0.1.0" (instance $rt
    (type $ll (enum "debug" "info" "warn" "error"))
    (export "log-level" (type $llx (eq $ll)))
    (export "log" (func (param "level" $llx) (param "message" string)))
    (export "now" (func (result u64)))))
  ;; ---------------------------------------------------------------------------
  ;; Linear memory and a bump allocator, in a core module of their own so that
  ;; they exist before the host functions are lowered (lowering a function that
  ;; takes or returns strings needs the memory and `realloc`).
  ;;
  ;; Layout: 0..1023 is static (result area at 16, constants from 64);
  ;; the heap starts at 1024. `realloc` grows memory as needed. `post` is the
  ;; post-return function of every export: once the host has copied a call's
  ;; results out, everything that call allocated is garbage, so the heap is
  ;; reset to 1024 and memory use does not creep from call to call.
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
  ;; log takes a string, so lowering it needs the memory
  (core func $log (canon lower (func $rt "log") (memory (core memory $mem "mem"))))
  (core func $now (canon lower (func $rt "now")))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "env" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    (import "rt" "log" (func $log (param i32 i32 i32)))
    (import "rt" "now" (func $now (result i64)))
    (data (i32.const 64) "trap")
    (data (i32.const 72) "0")
    (data (i32.const 80) "counter: state is not a decimal number")
    (data (i32.const 120) "init")
    ;; init -> log(info, "init"); now(); then ok(args) if args non-empty, else ok("0")
    (func (export "init") (param $sp i32) (param $sl i32) (param $ap i32) (param $al i32)
          (result i32)
      (call $log (i32.const 1) (i32.const 120) (i32.const 4))
      (drop (call $now))
      (i32.store8 (i32.const 16) (i32.const 0))
      (if (local.get $al)
        (then
          (i32.store (i32.const 20) (local.get $ap))
          (i32.store (i32.const 24) (local.get $al)))
        (else
          (i32.store (i32.const 20) (i32.const 72))
          (i32.store (i32.const 24) (i32.const 1))))
      (i32.const 16))
    (func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32)
          (result i32)
      (local $n i64) (local $i i32) (local $c i32) (local $end i32) (local $p i32)
      ;; message == "trap" -> unreachable
      (if (i32.and (i32.eq (local.get $ml) (i32.const 4))
                   (i32.eq (i32.load (local.get $mp)) (i32.load (i32.const 64))))
        (then unreachable))
      ;; parse the state as a decimal number
      (block $parsed
        (loop $digit
          (br_if $parsed (i32.ge_u (local.get $i) (local.get $sl)))
          (local.set $c
            (i32.sub (i32.load8_u (i32.add (local.get $sp) (local.get $i))) (i32.const 48)))
          (if (i32.gt_u (local.get $c) (i32.const 9))
            (then
              ;; err("counter: state is not a decimal number")
              (i32.store8 (i32.const 16) (i32.const 1))
              (i32.store (i32.const 20) (i32.const 80))
              (i32.store (i32.const 24) (i32.const 38))
              (return (i32.const 16))))
          (local.set $n
            (i64.add (i64.mul (local.get $n) (i64.const 10)) (i64.extend_i32_u (local.get $c))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $digit)))
      (local.set $n (i64.add (local.get $n) (i64.const 1)))
      ;; format n into a fresh 20-byte buffer, right-aligned
      (local.set $end
        (i32.add (call $realloc (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 20))
                 (i32.const 20)))
      (local.set $p (local.get $end))
      (loop $fmt
        (local.set $p (i32.sub (local.get $p) (i32.const 1)))
        (i32.store8 (local.get $p)
          (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
        (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
        (br_if $fmt (i64.ne (local.get $n) (i64.const 0))))
      ;; ok({state: n, reply: some(n)}) -- both strings share the buffer
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $p))
      (i32.store (i32.const 24) (i32.sub (local.get $end) (local.get $p)))
      (i32.store8 (i32.const 28) (i32.const 1))
      (i32.store (i32.const 32) (local.get $p))
      (i32.store (i32.const 36) (i32.sub (local.get $end) (local.get $p)))
      (i32.const 16)))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "rt" (instance (export "log" (func $log)) (export "now" (func $now))))))
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
