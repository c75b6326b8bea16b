"""A 16-lane float32 vector for numba kernels: one AVX-512 register, written like C intrinsics.

numba has no vector type, and LLVM's auto-vectorizer will not keep a matmul's tile of accumulators in
registers (it either leaves them in memory, paying a load and a store per multiply-add, or reduces along the
wrong axis). This module adds the type `f32x16` and the operations below, each lowered to one LLVM
instruction over `<16 x float>`. A kernel that holds its accumulators in `f32x16` locals compiles to a loop of
vector loads, broadcasts and FMAs with the tile in registers (see `matmul.py`). Where the CPU lacks AVX-512,
LLVM splits each operation into two 8-lane ones: still correct, slower.

    load16(a, i)      a[i:i + 16] of a C-contiguous float32 array, i a flat element index (no bounds check)
    store16(a, i, v)  a[i:i + 16] = v
    lane(v, c)        v[c], a float32
    splat16(x)        [x] * 16
    zeros16()         [0.0] * 16
    fma16(a, b, c)    a * b + c, lane by lane, rounded once
    max16(a, b)       the larger of a and b, lane by lane
    hmax16(v)         the largest lane of v, a float32
    hsum16(v)         the sum of v's lanes, a float32 (in a tree: the order is fixed, not the lanes' order)
    prefetch_write(a, i)   a hint: the cache line of a[i] is about to be written
    prefetch_read(a, i)    a hint: the cache line of a[i] is about to be read
    has_avx512()      whether numba compiles for AVX-512 (plain Python, for choosing a tile)

And a second vector type, `bf16x32`: 32 bfloat16 values (the top halves of float32s), taken in pairs, for
AVX512_BF16's dot product (`vdpbf16ps`). The same three operations read it, chosen by the types they are given:

    load16(a, i)      a[i:i + 16] of a C-contiguous uint32 array, each element a pair of bf16 (low half first)
    splat16(x)        a uint32 x (one pair) in all 16 lanes
    fma16(a, b, c)    a, b bf16x32, c f32x16: c[l] + a[2l] b[2l] + a[2l + 1] b[2l + 1], products exact in float32

so a tile written once over `fma16` is the float32 kernel over float32 arrays and the bf16 kernel over uint32
pairs (kernels/matmul.py). Code that uses bf16x32 compiles only for a CPU with AVX512_BF16 (`has_avx512_bf16`):
LLVM cannot lower vdpbf16ps for any other, so the bf16 kernels are compiled at their first call, never at import.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_VEC = ir.VectorType(ir.FloatType(), LANES)
_I32 = ir.IntType(32)
_PAIRS = ir.VectorType(_I32, LANES)  # bf16x32 as it is held: 16 lanes of two bf16 each




class F32x16(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


class BF16x32(types.Type):
    def __init__(self):
        super().__init__(name="bf16x32")


f32x16 = F32x16()
bf16x32 = BF16x32()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):  # held as an LLVM value: lives in a register
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


@register_model(BF16x32)
class _BF16x32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _PAIRS)


def _vector_pointer(context, builder, array_type, array, index, vector=_VEC):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), vector.as_pointer())


def _is_f32_c_array(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.layout == "C"


def _is_u32_c_array(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.uint32 and t.layout == "C"


@intrinsic
def load16(typingctx, array, index):
    if not isinstance(index, types.Integer):
        return None
    if _is_u32_c_array(array):  # 16 pairs of bf16
        def codegen_pairs(context, builder, sig, args):
            return builder.load(_vector_pointer(context, builder, sig.args[0], args[0], args[1], _PAIRS), align=4)

        return bf16x32(array, index), codegen_pairs
    if not _is_f32_c_array(array):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_vector_pointer(context, builder, sig.args[0], args[0], args[1]), align=4)

    return f32x16(array, index), codegen


@intrinsic
def store16(typingctx, array, index, value):
    if not (_is_f32_c_array(array) and isinstance(index, types.Integer) and value == f32x16):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _vector_pointer(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def lane(typingctx, value, index):
    if not (value == f32x16 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], builder.trunc(args[1], _I32) if args[1].type.width > 32 else args[1])

    return types.float32(value, index), codegen


@intrinsic
def splat16(typingctx, x):
    if x not in (types.float32, types.uint32):
        return None
    vector = _VEC if x == types.float32 else _PAIRS

    def codegen(context, builder, sig, args):
        one = builder.insert_element(ir.Constant(vector, ir.Undefined), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))

    return (f32x16 if x == types.float32 else bf16x32)(x), codegen


@intrinsic
def zeros16(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VEC, [0.0] * LANES)

    return f32x16(), codegen


@intrinsic
def fma16(typingctx, a, b, c):
    if a == b == bf16x32 and c == f32x16:  # AVX512_BF16: c + the dot products of a's and b's pairs
        def codegen_pairs(context, builder, sig, args):
            # the pairs as <16 x i32>: the intrinsic's type up to LLVM 16, which LLVM 17+ (typed <32 x bfloat>)
            # still accepts and upgrades; the other way round, LLVM 14-15 (numba 0.59-0.61) reject <32 x bfloat>
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VEC, [_VEC, _PAIRS, _PAIRS]), "llvm.x86.avx512bf16.dpbf16ps.512"
            )
            return builder.call(fn, [args[2], args[0], args[1]])

        return f32x16(a, b, c), codegen_pairs
    if not (a == b == c == f32x16):
        return None

    def codegen(context, builder, sig, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 3), "llvm.fma.v16f32")
        return builder.call(fma, args)

    return f32x16(a, b, c), codegen


@intrinsic
def max16(typingctx, a, b):
    if not (a == b == f32x16):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 2), "llvm.maxnum.v16f32")
        return builder.call(fn, args)

    return f32x16(a, b), codegen


@intrinsic
def hmax16(typingctx, v):
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [_VEC]),
                                            "llvm.vector.reduce.fmax.v16f32")
        return builder.call(fn, args)

    return types.float32(v), codegen


@intrinsic
def hsum16(typingctx, v):
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), _VEC]),
                                            "llvm.vector.reduce.fadd.v16f32")
        # reassoc: a tree of adds (LLVM's fixed shuffle pattern), not 16 in a chain; the same tree every time
        return builder.call(fn, [ir.Constant(ir.FloatType(), 0.0), args[0]], fastmath=("reassoc",))

    return types.float32(v), codegen


def _prefetch(write: int):
    # llvm.prefetch(address, rw, locality 3 = keep in all levels, data cache) of the line holding a[i]
    def typer(typingctx, array, index):
        if not ((_is_f32_c_array(array) or _is_u32_c_array(array)) and isinstance(index, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32]), "llvm.prefetch.p0"
            )
            builder.call(fn, [ptr, ir.Constant(_I32, write), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            return context.get_dummy_value()

        return types.void(array, index), codegen

    return typer


prefetch_write = intrinsic(_prefetch(1))  # the cache line holding a[i] will be written soon
prefetch_read = intrinsic(_prefetch(0))  # the cache line holding a[i] will be read soon


def target_features() -> str:
    """The CPU features numba's JIT compiles for: the host's, less AVX when NUMBA_ENABLE_AVX=0, or
    NUMBA_CPU_FEATURES when set, read the way numba reads them (plain Python)."""
    from numba.core import codegen, config

    return config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()


def has_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (plain Python, for choosing a tile)."""
    return "+avx512f" in target_features().split(",")


def has_avx512_bf16() -> bool:
    """Whether numba compiles for a CPU with AVX512_BF16 (vdpbf16ps), on which the bf16 kernels can run."""
    features = target_features().split(",")
    return "+avx512f" in features and "+avx512bf16" in features
