;; start_now.wat -- echo.wat, except that a core module's start function reads the clock.
;;
;; init(state, args)      -> ok(args)
;; handle(state, message) -> ok({state, reply: some(message)})
;; Imports runtime.now, called once, by a start function while the component
;; is instantiated: before any call, and so before the worker may know its
;; agent. Exists to test that a spare that loads components ahead of their
;; agents never uses an instance whose instantiation reached the host (its
;; host-call record would belong to no agent): the worker instantiates again
;; once it has the agent, and the record is on that agent's chain.
(component
  (type $outcome (record (field "state" string) (field "reply" (option string))))
  (import "theater:agent/runtime@0.1.0" (instance $rt
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
  (core func $now (canon lower (func $rt "now")))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "rt" "now" (func $now (result i64)))
    (global $started (mut i64) (i64.const 0))
    (func $start (global.set $started (call $now)))
    (start $start)
    ;; init -> ok(args)
    (func (export "init") (param $sp i32) (param $sl i32) (param $ap i32) (param $al i32)
          (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $ap))
      (i32.store (i32.const 24) (local.get $al))
      (i32.const 16))
    ;; handle -> ok({state, reply: some(message)})
    ;; result<outcome,string> at 16: disc 16, state ptr 20, state len 24,
    ;; option disc 28, reply ptr 32, reply len 36
    (func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32)
          (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $sp))
      (i32.store (i32.const 24) (local.get $sl))
      (i32.store8 (i32.const 28) (i32.const 1))
      (i32.store (i32.const 32) (local.get $mp))
      (i32.store (i32.const 36) (local.get $ml))
      (i32.const 16)))
  (core instance $i (instantiate $m (with "env" (instance $mem))
                                    (with "rt" (instance (export "now" (func $now))))))
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
