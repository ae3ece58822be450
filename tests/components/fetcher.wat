;; fetcher.wat -- an agent that makes HTTP requests (the http capability),
;; driven entirely by its messages. The state is never changed.
;;   "[h=<name>:<value>;]<METHOD> <url>[ <body>]"
;;     -> http.fetch(METHOD, url, [the header, if given], body or "");
;;        reply "<status> <body>" or "err:<case>:<detail>"
;;   "h*<n>=<name>:<value>;<METHOD> <url>[ <body>]": the same with that header n times
;; <case> is the http-error case's WIT name.
;;
;; Exists to test the http capability end to end against a real server:
;; what the policy allows, refuses, sizes and times out, and secrets added
;; at the boundary that never reach the guest.
(component
  (type $outcome (record (field "state" string) (field "reply" (option string))))
  (type $response (record (field "status" u16) (field "headers" (list (tuple string string)))
                          (field "body" string)))
  (type $http-error (variant
    (case "denied" string) (case "private-address" string) (case "too-large" string)
    (case "timeout" string) (case "failed" string)))
  (import "theater:agent/http@0.1.0" (instance $http
    (export "response" (type $r (eq $response)))
    (export "http-error" (type $e (eq $http-error)))
    (export "fetch" (func (param "method" string) (param "url" string)
                          (param "headers" (list (tuple string string))) (param "body" string)
                          (result (result $r (error $e)))))))
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
  (core func $fetch (canon lower (func $http "fetch")
    (memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))))
  (core module $m
    (import "env" "mem" (memory 1))
    (import "env" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    ;; fetch(method, url, headers list, body, return area): result<response, http-error>
    ;;   disc +0; ok: status (u16) +4, headers ptr +8, count +12, body ptr +16, len +20;
    ;;   err: case +4, ptr +8, len +12
    (import "http" "fetch" (func $fetch (param i32 i32 i32 i32 i32 i32 i32 i32 i32)))
    (data (i32.const 64) "h=")
    (data (i32.const 80) "h*")
    (data (i32.const 136) "err:")
    (data (i32.const 194) ":")
    (data (i32.const 196) " ")
    (data (i32.const 600) "deniedprivate-addresstoo-largetimeoutfailed")
    (data (i32.const 700)
      "\58\02\00\00\06\00\00\00" "\5e\02\00\00\0f\00\00\00" "\6d\02\00\00\09\00\00\00"
      "\76\02\00\00\07\00\00\00" "\7d\02\00\00\06\00\00\00")
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

    ;; the index of the first c in (p, l) at or after i, or l
    (func $find (param $p i32) (param $l i32) (param $i i32) (param $c i32) (result i32)
      (block $found
        (loop $scan
          (br_if $found (i32.ge_u (local.get $i) (local.get $l)))
          (br_if $found (i32.eq (i32.load8_u (i32.add (local.get $p) (local.get $i))) (local.get $c)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $scan)))
      (local.get $i))

    (func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32) (result i32)
      (local $i i32) (local $j i32) (local $k i32) (local $hn i32) (local $case i32)
      (local $total i32) (local $buf i32) (local $end i32) (local $bp i32) (local $bl i32)
      (local $eq i32) (local $list i32)
      ;; "h=<name>:<value>;": one header, as a list of one (name, value) pair at 900;
      ;; "h*<n>=<name>:<value>;": that pair n times, the list on the heap. eq: where the '=' is
      (local.set $list (i32.const 900))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 64) (i32.const 2))
        (then
          (local.set $eq (i32.const 1))
          (local.set $hn (i32.const 1))))
      (if (call $starts (local.get $mp) (local.get $ml) (i32.const 80) (i32.const 2))
        (then
          (local.set $eq (call $find (local.get $mp) (local.get $ml) (i32.const 2) (i32.const 61)))
          (local.set $hn (call $number (i32.add (local.get $mp) (i32.const 2)) (i32.sub (local.get $eq) (i32.const 2))))))
      (if (local.get $eq)
        (then
          (local.set $j (call $find (local.get $mp) (local.get $ml) (i32.add (local.get $eq) (i32.const 1)) (i32.const 58)))
          (local.set $k (call $find (local.get $mp) (local.get $ml) (local.get $j) (i32.const 59)))
          (i32.store (i32.const 900) (i32.add (i32.add (local.get $mp) (local.get $eq)) (i32.const 1)))
          (i32.store (i32.const 904) (i32.sub (i32.sub (local.get $j) (local.get $eq)) (i32.const 1)))
          (i32.store (i32.const 908) (i32.add (i32.add (local.get $mp) (local.get $j)) (i32.const 1)))
          (i32.store (i32.const 912) (i32.sub (i32.sub (local.get $k) (local.get $j)) (i32.const 1)))
          (if (i32.gt_u (local.get $hn) (i32.const 1))
            (then
              (local.set $list (call $realloc (i32.const 0) (i32.const 0) (i32.const 4)
                                             (i32.shl (local.get $hn) (i32.const 4))))
              (local.set $total (i32.const 0))
              (block $copied
                (loop $copy
                  (br_if $copied (i32.ge_u (local.get $total) (local.get $hn)))
                  (memory.copy (i32.add (local.get $list) (i32.shl (local.get $total) (i32.const 4)))
                               (i32.const 900) (i32.const 16))
                  (local.set $total (i32.add (local.get $total) (i32.const 1)))
                  (br $copy)))))
          (local.set $i (i32.add (local.get $k) (i32.const 1)))))
      ;; "<METHOD> <url>[ <body>]" from i
      (local.set $j (call $find (local.get $mp) (local.get $ml) (local.get $i) (i32.const 32)))
      (local.set $k (call $find (local.get $mp) (local.get $ml) (i32.add (local.get $j) (i32.const 1)) (i32.const 32)))
      (if (i32.lt_u (local.get $k) (local.get $ml))
        (then
          (local.set $bp (i32.add (i32.add (local.get $mp) (local.get $k)) (i32.const 1)))
          (local.set $bl (i32.sub (i32.sub (local.get $ml) (local.get $k)) (i32.const 1))))
        (else
          (local.set $bp (i32.const 0))
          (local.set $bl (i32.const 0))
          (local.set $k (local.get $ml))))
      (call $fetch (i32.add (local.get $mp) (local.get $i)) (i32.sub (local.get $j) (local.get $i))
                   (i32.add (i32.add (local.get $mp) (local.get $j)) (i32.const 1))
                   (i32.sub (i32.sub (local.get $k) (local.get $j)) (i32.const 1))
                   (local.get $list) (local.get $hn)
                   (local.get $bp) (local.get $bl) (i32.const 256))
      (if (i32.load8_u (i32.const 256))
        (then
          ;; "err:<case>:<detail>"
          (local.set $case (i32.load8_u (i32.const 260)))
          (local.set $total (i32.add (i32.add (i32.const 5)
                                              (i32.load (i32.add (i32.const 704) (i32.shl (local.get $case) (i32.const 3)))))
                                     (i32.load (i32.const 268))))
          (local.set $buf (call $alloc (local.get $total)))
          (drop (call $put
                  (call $put
                    (call $put (call $put (local.get $buf) (i32.const 136) (i32.const 4))
                               (i32.load (i32.add (i32.const 700) (i32.shl (local.get $case) (i32.const 3))))
                               (i32.load (i32.add (i32.const 704) (i32.shl (local.get $case) (i32.const 3)))))
                    (i32.const 194) (i32.const 1))
                  (i32.load (i32.const 264)) (i32.load (i32.const 268))))
          (return (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total)))))
      ;; "<status> <body>": the status written at 800
      (local.set $end (call $decimal (i32.const 800) (i32.load16_u (i32.const 260))))
      (i32.store8 (local.get $end) (i32.const 32))
      (local.set $end (i32.add (local.get $end) (i32.const 1)))
      (local.set $total (i32.add (i32.sub (local.get $end) (i32.const 800)) (i32.load (i32.const 276))))
      (local.set $buf (call $alloc (local.get $total)))
      (drop (call $put (call $put (local.get $buf) (i32.const 800) (i32.sub (local.get $end) (i32.const 800)))
                       (i32.load (i32.const 272)) (i32.load (i32.const 276))))
      (call $reply (local.get $sp) (local.get $sl) (local.get $buf) (local.get $total))))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "http" (instance (export "fetch" (func $fetch))))))
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
