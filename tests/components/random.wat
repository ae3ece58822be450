;; random.wat -- an agent that asks the host for randomness and its own id.
;;
;; init(state, args)      -> ok("")
;; handle(state, message) -> calls runtime self-id() (result ignored) and
;;                           random-bytes(16); ok({state: state,
;;                           reply: some(the 16 random bytes)})
;;
;; Exists to test host functions that return strings (the host allocates them
;; in guest memory through realloc) and to give replay something
;; nondeterministic to reproduce: the reply must equal the recorded bytes.
(component
  (type $outcome (record (field "state" string) (field "reply" (option string))))
  (import "theater:agent/runtime@0.1.0" (instance $rt
    (export "self-id" (func (result string)))
    (export "random-bytes" (func (param "len" u32) (result string)))))
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
  ;; both return strings, so lowering them needs the memory and realloc;
  ;; the lowered functions take a return pointer where (ptr, len) is written
  (core func $self_id (canon lower (func $rt "self-id")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core func $random_bytes (canon lower (func $rt "random-bytes")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "rt" "self-id" (func $self_id (param i32)))
    (import "rt" "random-bytes" (func $random_bytes (param i32 i32)))
    ;; init -> ok(""): result<string,string> at 16 = disc, ptr, len
    (func (export "init") (param i32 i32 i32 i32) (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (i32.const 0))
      (i32.store (i32.const 24) (i32.const 0))
      (i32.const 16))
    (func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32)
          (result i32)
      (call $self_id (i32.const 40))                        ;; (ptr, len) at 40, 44
      (call $random_bytes (i32.const 16) (i32.const 48))    ;; (ptr, len) at 48, 52
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $sp))
      (i32.store (i32.const 24) (local.get $sl))
      (i32.store8 (i32.const 28) (i32.const 1))
      (i32.store (i32.const 32) (i32.load (i32.const 48)))
      (i32.store (i32.const 36) (i32.load (i32.const 52)))
      (i32.const 16)))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "rt" (instance
      (export "self-id" (func $self_id))
      (export "random-bytes" (func $random_bytes))))))
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
