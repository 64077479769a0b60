"""Fused attention forward for Hopper (sm_90), in Gluon: FlashAttention-3's schedule, which Triton's
compiler does not produce for the kernels in attention_fwd.py.

One program per 128 query rows of one head. Three partitions share the program's shared memory:
* a producer (the default partition, 4 warps, 24 registers each) that loads the two 64-row halves of
  Q once and streams K and V tiles through a ring of STAGES buffers with TMA;
* two consumer warpgroups, one per 64-row half (240 registers each, from setmaxnreg), each running the
  online softmax of attention_fwd.py over the key tiles.
Inside a consumer the next tile's Q K^T is issued before this tile's P V, and its softmax runs while
P V is in flight (wgmma is asynchronous). Between the consumers a ping-pong turn (two mbarriers)
orders their matmul issues so that one warpgroup's softmax overlaps the other's matmuls.

Logits are s_ij = rs_i (q_i . k_j) in the exp2 domain, with rs_i (the row scale of attention_fwd.py:
the temperature, the scale, log2(e) and under CosScale 1/||q_i||) computed by
attention_bwd.attention_bwd_prep_kernel before the launch. It covers what the host selects it for
(forward.py: hopper_forward): no attn_mask, window, key padding, packed sequences, dropout or entropy,
bfloat16/float16, D = Dv. It writes the same output and log-sum-exp as attention_fwd_kernel.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

ROWS = 128  # query rows per program: two consumer warpgroups of 64
BLOCK_M = gl.constexpr(ROWS)
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_WARPS = 4  # the kernel's num_warps: the default partition (the producer) has them
# H200, D = 128 (benchmarks/NOTES.md, "Gluon forward"): three ring slots of 128 keys (229 KB of shared
# memory with Q; two slots ran 15-20% slower)
BLOCK_N = 128
STAGES = 3


@gluon.jit
def _softmax(s, rs, m_i, l_i, offs_m, n0, shift, lk, MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
             BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """One key tile's online-softmax step on the raw scores ``s``: (p, new row max, new row sum, the
    old sums' rescale factor), as attention_fwd.py's _fwd_tiles (a row with no key yet keeps max -inf)."""
    s = s * gl.expand_dims(rs, 1)
    if MASKED:
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ok = gl.expand_dims(offs_n, 0) < lk
        if IS_CAUSAL:
            ok = ok & (gl.expand_dims(offs_n, 0) <= gl.expand_dims(offs_m, 1) + shift)
        s = gl.where(ok, s, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_sub = gl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_sub)
    p = gl.exp2(s - gl.expand_dims(m_sub, 1))
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, m0, n_blocks,
              HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads: the Q halves once, then K and V tile j into ring slot j % STAGES once both consumers
    released the slot's previous tile (separate K and V barriers: Q K^T may start before V lands)."""
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [m0, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [m0 + HALF, 0], q_bar, q_smem.index(1))
    for j in range(n_blocks):
        stage = j % STAGES
        mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [j * BLOCK_N, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [j * BLOCK_N, 0], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _consumer(c: gl.constexpr, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn,
              Out, Lse, RowScale, out_base, stride_om, row, m0, Lq, Lk, n_blocks, first_masked,
              HEAD_D: gl.constexpr, IS_CAUSAL: gl.constexpr, HALF: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr):
    """Consumer ``c``: the online softmax of rows [m0 + c HALF, m0 + (c + 1) HALF) over the key tiles;
    stores its output rows and log-sum-exps."""
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    shift = Lk - Lq
    mr = m0 + c * HALF
    offs_m = mr + gl.arange(0, HALF, layout=row_s)
    rs = gl.load(RowScale + row + offs_m, mask=offs_m < Lq, other=0.0)
    m_i = gl.full([HALF], -float("inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([HALF], gl.float32, layout=row_s)
    acc = gl.zeros([HALF, HEAD_D], gl.float32, layout=o_layout)
    s0 = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    q = q_smem.index(c)
    mbarrier.wait(q_bar, 0)
    if n_blocks > 0:
        mbarrier.wait(turn.index(c), 0)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s0, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - c))
        s = warpgroup_mma_wait(0, deps=(s, ))
        if first_masked == 0:
            p, m_i, l_i, alpha = _softmax(s, rs, m_i, l_i, offs_m, 0, shift, Lk, True, IS_CAUSAL, BLOCK_N,
                                          s_layout)
        else:
            p, m_i, l_i, alpha = _softmax(s, rs, m_i, l_i, offs_m, 0, shift, Lk, False, IS_CAUSAL, BLOCK_N,
                                          s_layout)
        for j in range(1, n_blocks):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            # my turn to issue matmuls (the other warpgroup is in its softmax)
            mbarrier.wait(turn.index(c), j & 1)
            mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
            s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s0, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            mbarrier.arrive(turn.index(1 - c))
            # the scores finish first (wgmma groups complete in order); P V runs on under the softmax
            s = warpgroup_mma_wait(1, deps=(s, ))
            if j >= first_masked:
                p, m_i, l_i, alpha = _softmax(s, rs, m_i, l_i, offs_m, j * BLOCK_N, shift, Lk, True,
                                              IS_CAUSAL, BLOCK_N, s_layout)
            else:
                p, m_i, l_i, alpha = _softmax(s, rs, m_i, l_i, offs_m, j * BLOCK_N, shift, Lk, False,
                                              IS_CAUSAL, BLOCK_N, s_layout)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(kv_empty.index(prev))  # (the ring slot goes back to the producer)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        last = (n_blocks - 1) % STAGES
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(kv_empty.index(last))
    has_key = l_i > 0
    l_o = gl.convert_layout(gl.where(has_key, l_i, 1.0), row_o)
    out = acc / gl.expand_dims(l_o, 1)
    offs_mo = mr + gl.arange(0, HALF, layout=row_o)
    offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    ptrs = Out + out_base + gl.expand_dims(offs_mo.to(gl.int64), 1) * stride_om + gl.expand_dims(offs_d, 0)
    gl.store(ptrs, out.to(dtype), mask=gl.expand_dims(offs_mo < Lq, 1))
    lse = gl.where(has_key, m_i + gl.log2(gl.where(has_key, l_i, 1.0)), float("inf"))
    gl.store(Lse + row + offs_m, lse, mask=offs_m < Lq)


@gluon.jit
def attention_fwd_hopper_kernel(
    Q, K, V, Out, Lse, RowScale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    Hq, Lq, Lk, GROUP,
    HEAD_D: gl.constexpr, IS_CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), Hq, B), num_warps = PRODUCER_WARPS. Out (B, Hq, Lq, D) in Q's dtype and
    Lse[b, h, i] = log2 of row i's sum of 2^s (+inf for a row that sees no key); RowScale[b, h, i] = rs_i."""
    HALF: gl.constexpr = BLOCK_M // 2
    pid_m = gl.program_id(0)
    if IS_CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m  # longest rows first
    h = gl.program_id(1)
    b = gl.program_id(2).to(gl.int64)
    hk = (h // GROUP).to(gl.int64)
    h64 = h.to(gl.int64)
    m0 = pid_m * BLOCK_M
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, HEAD_D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dtype)
    q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h64 * stride_qh, shape=[Lq, HEAD_D],
                                        strides=[stride_qm, 1], block_shape=[HALF, HEAD_D], layout=q_layout)
    k_desc = tma.make_tensor_descriptor(K + b * stride_kb + hk * stride_kh, shape=[Lk, HEAD_D],
                                        strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_D],
                                        layout=kv_layout)
    v_desc = tma.make_tensor_descriptor(V + b * stride_vb + hk * stride_vh, shape=[Lk, HEAD_D],
                                        strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_D],
                                        layout=kv_layout)
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_D], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a slot
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    mbarrier.arrive(turn.index(0))  # consumer 0 issues first

    # key tiles [0, n_blocks) hold every key some row sees (causal: bottom-right aligned, as in
    # attention_fwd.py); from first_masked on they need the mask (the diagonal, keys past Lk)
    shift = Lk - Lq
    hi = Lk
    first_masked = Lk // BLOCK_N
    if IS_CAUSAL:
        hi = gl.minimum(hi, m0 + BLOCK_M + shift)
        first_masked = gl.minimum(first_masked, gl.maximum(m0 + shift + 1, 0) // BLOCK_N)
    n_blocks = gl.cdiv(gl.maximum(hi, 0), BLOCK_N)
    row = (b * Hq + h64) * Lq
    out_base = b * stride_ob + h64 * stride_oh
    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, m0,
                     n_blocks, HALF, BLOCK_N, STAGES)),
        (_consumer, (0, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, Out, Lse, RowScale,
                     out_base, stride_om, row, m0, Lq, Lk, n_blocks, first_masked,
                     HEAD_D, IS_CAUSAL, HALF, BLOCK_N, STAGES)),
        (_consumer, (1, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, Out, Lse, RowScale,
                     out_base, stride_om, row, m0, Lq, Lk, n_blocks, first_masked,
                     HEAD_D, IS_CAUSAL, HALF, BLOCK_N, STAGES)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
