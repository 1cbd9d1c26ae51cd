/* The argument layouts of the fused one-token kernels (one_token_impl.h), as X-macro field lists: each kernel
 * takes a pointer to one struct built from its list, and the same list gives the text that the kernel's
 * NAME(..._layout)() returns. wuneng/fused/_abi.py declares the matching ctypes structures and compares
 * their fields with that text when the library is loaded, so a field added, removed, renamed or reordered on
 * either side fails at load with the two layouts side by side instead of passing pointers into the wrong slots.
 *
 * Kinds: INT an int64_t, F64 a double, IN a const real * (input, may be NULL where the kernel says so),
 * OUT a real * (output or scratch). Change a list here and in _abi.py together, and bump WUNENG_KERNEL_ABI. */
#ifndef WUNENG_ARGS_H
#define WUNENG_ARGS_H

#define WUNENG_KERNEL_ABI 6

#define TIME_MIX_FIELDS(INT, F64, IN, OUT)                                                                      \
    INT(B) INT(C) INT(H) INT(N) INT(Dw) INT(Da) INT(Dv) INT(Dg) INT(value_residual) INT(sse_blocks)          \
    INT(threads) F64(eps)                                                                                       \
    IN(x) IN(mask) IN(shift) IN(state) IN(v_first) IN(mix) IN(W_r) IN(W_k) IN(W_v) IN(W_o) IN(w0) IN(w1)      \
    IN(w2) IN(a0) IN(a1) IN(a2) IN(v0) IN(v1) IN(v2) IN(g1) IN(g2) IN(k_k) IN(k_a) IN(r_k) IN(ln_w) IN(ln_b)  \
    OUT(work) OUT(out) OUT(shift_out) OUT(state_out) OUT(v_first_out) OUT(readout_out)

#define HYBRID_STATE_FIELDS(INT, F64, IN, OUT)                                                                  \
    INT(B) INT(C) INT(H) INT(Hkv) INT(N) INT(Dw) INT(Da) INT(Dv) INT(Dr) INT(Dg) INT(Dm) INT(Wm)               \
    INT(value_residual) INT(threads) F64(eps)                                                                   \
    IN(u) IN(mask) IN(shift) IN(state) IN(v_first) IN(q) IN(k) IN(v) IN(mix)                                   \
    IN(w0) IN(w1) IN(w2) IN(a0) IN(a1) IN(a2) IN(v0) IN(v1) IN(v2) IN(R1) IN(R2) IN(G1) IN(G2) IN(gate_bias) \
    IN(P1) IN(P2) IN(k_k) IN(k_a) IN(r_k) IN(ln_w) IN(ln_b)                                                    \
    OUT(work) OUT(y_out) OUT(shift_out) OUT(state_out) OUT(v_first_out) OUT(gamma_out) OUT(middle_out)

#define CHANNEL_MIX_FIELDS(INT, F64, IN, OUT)                                                                   \
    INT(B) INT(C) INT(F) INT(threads)                                                                           \
    IN(x) IN(mask) IN(shift) IN(mix) IN(W_key) IN(W_value)                                                      \
    OUT(work) OUT(out) OUT(shift_out)

#define LINEAR_FIELDS(INT, F64, IN, OUT) INT(B) INT(O) INT(I) INT(threads) IN(x) IN(W) OUT(y)

/* struct members (`real` is the including file's scalar type) */
#define FIELD_INT(n) int64_t n;
#define FIELD_F64(n) double n;
#define FIELD_IN(n) const real *n;
#define FIELD_OUT(n) real *n;
/* the layout text: "kind:name;" per field */
#define TEXT_INT(n) "i:" #n ";"
#define TEXT_F64(n) "d:" #n ";"
#define TEXT_IN(n) "p:" #n ";"
#define TEXT_OUT(n) "o:" #n ";"
/* locals of the same names inside a kernel, read from its `args` */
#define UNPACK_INT(n) const int64_t n = args->n;
#define UNPACK_F64(n) const double n = args->n;
#define UNPACK_IN(n) const real *n = args->n;
#define UNPACK_OUT(n) real *n = args->n;

#endif
