"""Group-wise low-bit linears (`intx`) in an ``.onnx``: ONNX Runtime's ``MatMulNBits``.

A compiled graph holds an intx layer as per-token int8 input quantization, int8-held codes
dequantized per group (``quantized_decomposed.dequantize_per_channel_group``) and
``aten.linear``. Standard ONNX has no per-token quantizer, and a dequantized weight would be
folded back to float32 by the runtime. So before the ONNX exporter sees it, each such layer
becomes one call of ``fxcompress::matmul_nbits`` (`nbits_graph`), whose ONNX translation is
ONNX Runtime's contrib op ``com.microsoft.MatMulNBits`` (`onnx_translations`):

- the codes, moved to unsigned by 2^(bits-1) (the op's default zero point), packed along the
  input dimension low bits first, in containers of 2, 4 or 8 bits (`CONTAINERS`): 4-bit weights
  take half a byte each in the file; 3-bit ones ride in 4-bit containers and 5-7-bit ones in
  bytes, exact but no smaller than int8;
- one float32 scale per group;
- ``accuracy_level = 4``: the runtime quantizes the input to int8 itself, per block of
  `group_size` input columns rather than per token (finer, so no less exact), and runs its int8
  x low-bit kernels (MLAS).

``fxcompress::matmul_nbits`` computes in PyTorch what the compiled layer computes (per-token
int8 input, dequantized weight, linear), so the exported program is the compiled model; the
file is checked in ONNX Runtime against it like every export.

int8 layers with narrower codes (`[int8] packed_bits`: per-channel 4-bit codes behind a
``dequantize_per_channel`` whose range is [-8, 7]) are stored the same way wherever a file is
written from the graph: the codes packed two per byte (`pack_codes`), unpacked to the int8
tensor the layer reads by a mask, a division, a concatenation, a convert and a subtraction
(`unpack_codes`), ops every runtime here has (the ``.pt2``'s `packed_graph`; the Cortex-M
``.pte``, whose CMSIS-NN kernels read int8 weights only, `fxcompress.export.cortex_m`).
"""

from __future__ import annotations

import copy

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
from torch import fx

from fxcompress.errors import FxCompressError
from fxcompress.graph import LAYER_META, drop_unused_attrs, get_attr, op_type

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten

#: the code widths MatMulNBits reads; a layer's codes ride in the narrowest that holds them
CONTAINERS = (2, 4, 8)
#: the smallest group MatMulNBits takes (its block size is a power of two, at least 16)
MIN_BLOCK = 16


#: ops `unpack_codes` adds before a layer (mask, division, concatenation, convert, offset,
#: view)
UNPACK_OPS = 6
#: bytes per code the unpacking holds at its peak, beside the layer's input: the two unpacked
#: halves and their concatenation, then the concatenation and its int8 copy (one byte each)
UNPACK_SCRATCH = 2


def pack_codes(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Signed 4-bit codes `q` (any shape, in [-8, 7]) as uint8 (ceil(numel / 2),): the first
    half of the flattened codes in the low nibbles, the second in the high ones, each plus 8
    (a padding code of 0 where numel is odd). Halves rather than neighbours, so that unpacking
    is one concatenation rather than an interleave."""
    if bits != 4:
        raise ValueError(f"pack_codes packs 4-bit codes, not {bits}-bit")
    u = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    half = (u.numel() + 1) // 2
    if u.numel() % 2:
        u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
    return u[:half] | (u[half:] << 4)


#: the ops `unpack_codes` writes in an aten graph (a Cortex-M program gives its edge ops)
ATEN_UNPACK_OPS = {
    "and": aten.bitwise_and.Scalar, "high": aten.div.Scalar_mode, "cat": aten.cat.default,
    "slice": aten.slice.Tensor, "sub": aten.sub.Scalar, "view": aten.reshape.default}


def unpack_codes(emit, packed: fx.Node, shape: tuple, convert) -> fx.Node:
    """Nodes computing the int8 codes of `shape` that `pack_codes` stored in `packed`:
    ``emit(key, args, kwargs={})`` makes the call of the op `ATEN_UNPACK_OPS[key]` names (or
    its equivalent in another dialect) and ``convert(node)`` the uint8 -> int8 convert."""
    n = 1
    for d in shape:
        n *= int(d)
    # the high nibble by a floor division (a right shift is not a core ATen op, which
    # ExecuTorch's lowering refuses)
    u = emit("cat", ([emit("and", (packed, 15)), emit("high", (packed, 16), {"rounding_mode":
                                                                            "floor"})],))
    if n % 2:
        u = emit("slice", (u, 0, 0, n))
    return emit("view", (emit("sub", (convert(u), 8)), list(shape)))


def unpack_reference(packed: torch.Tensor, shape: tuple) -> torch.Tensor:
    """What `unpack_codes` computes, eagerly, with the same aten ops (for checks)."""
    return unpack_codes(lambda k, a, kw=None: ATEN_UNPACK_OPS[k](*a, **(kw or {})), packed, shape,
                        lambda u: u.to(torch.int8))


def _narrow_dequantize(node: fx.Node) -> int | None:
    """The code width of a ``dequantize_per_channel`` / ``_group`` node whose integer range is
    narrower than a byte, reading a stored tensor; None for any other node."""
    if node.op != "call_function" or node.target not in (
            qd.dequantize_per_channel.default, qd.dequantize_per_channel_group.default):
        return None
    bits = _bits(node)
    src = node.args[0]
    if bits >= 8 or not (isinstance(src, fx.Node) and src.op == "get_attr"):
        return None
    return bits


def code_widths(gm: fx.GraphModule) -> dict[str, int]:
    """Stored tensor -> the width its codes take in a file (the container they pack into),
    for the codes narrower than a byte that `gm` holds one a byte."""
    widths = {}
    for node in gm.graph.nodes:
        bits = _narrow_dequantize(node)
        if bits is not None and container_bits(bits) < 8:
            widths[str(node.args[0].target)] = container_bits(bits)
    return widths


def has_narrow_codes(gm: torch.nn.Module) -> bool:
    """Whether `gm` holds codes that a written file packs below a byte (`packed_graph`)."""
    return isinstance(gm, fx.GraphModule) and bool(code_widths(gm))


def container_bits(bits: int) -> int:
    """The MatMulNBits code width that holds `bits`-bit signed codes exactly."""
    return next(c for c in CONTAINERS if c >= bits)


def pack(q: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Signed codes q (N, K) in [-2^(bits-1), 2^(bits-1)) as MatMulNBits' B: uint8 (N, K /
    group, group x container / 8), each code plus 2^(container-1), low bits first."""
    cb = container_bits(bits)
    n, k = q.shape
    u = (q.to(torch.int16) + (1 << (cb - 1))).to(torch.uint8).reshape(n, k // group, group)
    per = 8 // cb
    u = u.reshape(n, k // group, group // per, per)
    out = torch.zeros(u.shape[:-1], dtype=torch.uint8)
    for i in range(per):
        out |= u[..., i] << (i * cb)
    return out


def unpack(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The signed codes (N, K) int8 that `pack` stored."""
    cb = container_bits(bits)
    per = 8 // cb
    n, blocks, blob = packed.shape
    mask = (1 << cb) - 1
    parts = [(packed >> (i * cb)) & mask for i in range(per)]
    u = torch.stack(parts, dim=-1).reshape(n, blocks * group)
    return (u.to(torch.int16) - (1 << (cb - 1))).to(torch.int8)


@torch.library.custom_op("fxcompress::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, group_size: int, k: int, n: int
                 ) -> torch.Tensor:
    """linear(x, W) + bias with x quantized to int8 per token, as the compiled intx layer
    computes it; W = codes x scale per group, the codes `pack`ed in `packed`, `scales` (N x
    groups,) flat."""
    q = unpack(packed, bits, group_size)
    w = (q.float().reshape(n, k // group_size, group_size)
         * scales.reshape(n, -1, 1)).reshape(n, k)
    s, z = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
    xq = qd.quantize_per_token(x, s, z, -128, 127, torch.int8)
    xd = qd.dequantize_per_token(xq, s, z, -128, 127, torch.int8, torch.float32)
    return torch.nn.functional.linear(xd, w, bias)


@matmul_nbits.register_fake
def _(x, packed, scales, bias, bits, group_size, k, n):
    return x.new_empty((*x.shape[:-1], n))


def _intx_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(linear, its input before per-token quantization, its weight's dequantize node) of each
    intx layer."""
    found = []
    for node in gm.graph.nodes:
        if op_type(node) != "linear" or len(node.args) < 2:
            continue
        xd, wd = node.args[0], node.args[1]
        if not (isinstance(wd, fx.Node) and wd.target == qd.dequantize_per_channel_group.default
                and isinstance(xd, fx.Node) and xd.target == qd.dequantize_per_token.default):
            continue
        xq = xd.args[0]
        if not (isinstance(xq, fx.Node) and xq.target == qd.quantize_per_token.default):
            continue
        found.append((node, xq.args[0], wd))
    return found


def has_intx(gm: torch.nn.Module) -> bool:
    """Whether `gm` holds group-wise low-bit (intx) linears."""
    return isinstance(gm, fx.GraphModule) and bool(_intx_layers(gm))


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copy of `gm`'s graph, sharing its weights and meta."""
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, remap)
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # the caller's output structure
    new = fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    return new


def _bits(wd: fx.Node) -> int:
    """The code width of a ``dequantize_per_channel_group`` or ``dequantize_per_channel``
    node, from its integer range."""
    lo, hi = wd.args[4:6] if wd.target == qd.dequantize_per_channel.default else wd.args[3:5]
    return (int(hi) - int(lo) + 1).bit_length() - 1


def packed_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` (sharing its other weights) in which the int8-held codes of each intx
    linear (per-token or weight-only) narrower than a byte are stored packed (`pack`, two
    4-bit or four 2-bit codes a byte) and unpacked in the graph by shifts and masks before
    their ``dequantize_per_channel_group`` (scales that bfloat16 or float16 holds exactly are
    stored so, and all-zero zero points are made in the graph, not stored), and int8 layers'
    4-bit codes likewise (`pack_codes`): what ``fxcompress.export`` writes as a ``.pt2``, so
    the file holds the codes at their width. `gm` keeps one code a byte, the form ExecuTorch's
    XNNPACK partitioner takes into its int4 kernel. Layers in 8-bit containers (5-8-bit
    codes) are left as they are; `gm` itself is returned when no layer packs."""
    new = _copy(gm)
    packed = _pack_int8_codes(new)
    grouped = [n for n in new.graph.nodes if n.target == qd.dequantize_per_channel_group.default
               and any(op_type(u) == "linear" for u in n.users)]  # per-token or weight-only
    for i, wd in enumerate(grouped):
        qn, bits = wd.args[0], _bits(wd)
        cb = container_bits(bits)
        if cb == 8 or not (isinstance(qn, fx.Node) and qn.op == "get_attr"):
            continue
        codes = get_attr(new, qn.target).detach()
        n, k = codes.shape
        name = f"_fxc_packed_{i}"
        new.register_buffer(name, pack(codes, bits, k).reshape(n, k * cb // 8))
        g = new.graph
        with g.inserting_before(wd):
            p = g.get_attr(name)
            parts = [g.call_function(aten.bitwise_and.Scalar, (
                g.call_function(aten.bitwise_right_shift.Tensor_Scalar, (p, j * cb)) if j
                else p, (1 << cb) - 1)) for j in range(8 // cb)]
            u = g.call_function(aten.reshape.default, (
                g.call_function(aten.stack.default, (parts, -1)), [n, k]))
            s = g.call_function(aten.sub.Tensor, (
                g.call_function(aten._to_copy.default, (u,), {"dtype": torch.int8}),
                1 << (cb - 1)))
            sn = wd.args[1]
            if isinstance(sn, fx.Node) and sn.op == "get_attr":
                scale = get_attr(new, sn.target).detach()
                half = next((h for h in (scale.to(torch.bfloat16), scale.to(torch.float16))
                             if torch.equal(h.float(), scale)), None)
                if half is not None:  # as the target keeps them (bf16 or fp16)
                    hn = f"_fxc_scale_{i}"
                    new.register_buffer(hn, half)
                    wd.replace_input_with(sn, g.call_function(
                        aten._to_copy.default, (g.get_attr(hn),), {"dtype": scale.dtype}))
            zn = wd.args[2]
            if isinstance(zn, fx.Node) and zn.op == "get_attr" \
                    and not get_attr(new, zn.target).any():  # symmetric: made, not stored
                z = g.call_function(aten.zeros.default, (list(get_attr(new, zn.target).shape),),
                                    {"dtype": torch.int8})
                wd.replace_input_with(zn, z)
        wd.replace_input_with(qn, s)
        packed = True
    if not packed:
        return gm
    drop_unused_attrs(new)  # the one-a-byte codes: torch.export would save them too
    new.delete_all_unused_submodules()
    new.recompile()
    return new


def _pack_int8_codes(gm: fx.GraphModule) -> bool:
    """Store the 4-bit codes of `gm`'s int8 layers (``dequantize_per_channel`` of range [-8,
    7]) packed (`pack_codes`), unpacked in the graph (`unpack_codes`); whether any were."""
    g, done = gm.graph, False
    for i, node in enumerate(list(g.nodes)):
        if node.target != qd.dequantize_per_channel.default or _narrow_dequantize(node) != 4:
            continue
        qn = node.args[0]
        codes = get_attr(gm, qn.target).detach()
        name = f"_fxc_int4_{i}"
        gm.register_buffer(name, pack_codes(codes))
        with g.inserting_before(node):
            q = unpack_codes(lambda k, a, kw=None: g.call_function(ATEN_UNPACK_OPS[k], a, kw),
                             g.get_attr(name), tuple(codes.shape),
                             lambda u: g.call_function(aten._to_copy.default, (u,),
                                                       {"dtype": torch.int8}))
        node.replace_input_with(qn, q)
        done = True
    return done


def nbits_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` (sharing its other weights) in which each intx layer is one
    ``fxcompress::matmul_nbits`` call on packed codes; `gm` is left as it is. Raises
    `FxCompressError` for a layer MatMulNBits cannot hold (a group that is not a power of two
    of at least `MIN_BLOCK`)."""
    new = _copy(gm)
    for i, (lin, x, wd) in enumerate(_intx_layers(new)):
        qn, sn, group = wd.args[0], wd.args[1], wd.args[6]
        layer = lin.meta.get(LAYER_META, lin.name)
        bits = _bits(wd)
        if group < MIN_BLOCK or group & (group - 1):
            raise FxCompressError(
                f"{layer} holds groups of {group} input columns, which ONNX Runtime's "
                f"MatMulNBits cannot read (its blocks are powers of two, at least {MIN_BLOCK});"
                " compile with an [intx] group_size of 16, 32, 64 or 128 for an .onnx, or write"
                " the .pte")
        codes = get_attr(new, qn.target).detach()
        scales = get_attr(new, sn.target).detach().float().reshape(-1)
        pname, sname = f"_fxc_nbits_{i}_packed", f"_fxc_nbits_{i}_scales"
        new.register_buffer(pname, pack(codes, bits, group))
        new.register_buffer(sname, scales.clone())
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        with new.graph.inserting_before(lin):
            p = new.graph.get_attr(pname)
            s = new.graph.get_attr(sname)
            call = new.graph.call_function(torch.ops.fxcompress.matmul_nbits.default,
                                           (x, p, s, bias, bits, group, *codes.shape[::-1]))
        call.meta.update({k: v for k, v in lin.meta.items() if k != "val"})
        lin.replace_all_uses_with(call)
        new.graph.erase_node(lin)
    drop_unused_attrs(new)
    new.delete_all_unused_submodules()
    new.recompile()
    return new


def _schema():
    """MatMulNBits' signature (the part this module writes: A, B, scales; K, N, bits,
    block_size, accuracy_level), which ONNX's own schema registry does not hold (it is ONNX
    Runtime's contrib op) and the exporter needs to build the node."""
    from onnx import defs

    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    ints = defs.OpSchema.AttrType.INT
    return defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], "float input and output"),
                          ("T2", ["tensor(uint8)"], "packed codes")],
        attributes=[attr("K", ints, "input columns"), attr("N", ints, "output columns"),
                    attr("bits", ints, "code width"), attr("block_size", ints, "group size"),
                    attr("accuracy_level", ints, "4: int8 compute")])


@torch.library.custom_op("fxcompress::dequantize_blocks", mutates_args=())
def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, group: int, n: int, k: int
                      ) -> torch.Tensor:
    """Codes q (n, k) int8 times their scale (n, k / group), one per block of `group` input
    columns, in the scale's dtype: what ``dequantize_per_channel_group`` of symmetric codes
    computes, written in ONNX as arithmetic the checking runtime runs, then made TensorRT's
    blocked ``DequantizeLinear`` of INT4 codes (`tensorrt._blocks_to_dq`)."""
    return (q.to(scale.dtype).reshape(n, k // group, group)
            * scale.reshape(n, k // group, 1)).reshape(n, k)


@dequantize_blocks.register_fake
def _(q, scale, group, n, k):
    return scale.new_empty((n, k))


def _blocks_translation() -> dict:
    """`dequantize_blocks` in ONNX before opset 21 (which has no blocks): the codes as rows
    of one block each, per-axis ``DequantizeLinear`` with one scale per row (a form the
    exporter's optimizer leaves unfolded, as it leaves int8 weights), reshaped back to (n, k):
    the pattern `tensorrt._blocks_to_dq` makes a blocked ``DequantizeLinear``."""
    from onnxscript import opset19 as op

    def translate(q, scale, group: int, n: int, k: int):
        rows = n * (k // group)
        dq = op.DequantizeLinear(op.Reshape(q, op.Constant(value_ints=[rows, group])),
                                 op.Reshape(scale, op.Constant(value_ints=[rows])), axis=0)
        return op.Reshape(dq, op.Constant(value_ints=[n, k]))

    return {torch.ops.fxcompress.dequantize_blocks.default: translate}


def onnx_translations() -> dict:
    """``fxcompress::matmul_nbits`` as ``com.microsoft.MatMulNBits`` (int8 compute), then the
    bias added."""
    import onnxscript
    from onnxscript import opset18 as op

    matmul_nbits_op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1),
                                           "MatMulNBits", _schema())

    def translate(x, packed, scales, bias, bits: int, group_size: int, k: int, n: int):
        y = matmul_nbits_op(x, packed, scales, K=k, N=n,
                             bits=container_bits(bits), block_size=group_size,
                             accuracy_level=4)
        return y if bias is None else op.Add(y, bias)

    return {torch.ops.fxcompress.matmul_nbits.default: translate, **_blocks_translation()}

