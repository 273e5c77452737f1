"""Fused MoE kernels (Triton) and their pure-torch reference.

Legend, used by every module here (docstrings, shape comments, argument names):
  T       tokens                      E       experts
  TOP_K   experts chosen per token    H       hidden size (model width)
  I       expert hidden size          G       quantisation group size (along K)
  K       the reduction dimension of a matmul, and nothing else (BLOCK_K: its tile)
  N       the output rows of a matmul (BLOCK_N: its tile); BLOCK_M: token rows of a tile
  pair    p = t * TOP_K + choice: one (token, chosen expert) of the router
  qw_row_len      length of one qweight row: K // 2 bytes for int4, K codes for int8
  groups_per_row  scales (and zeros) per row: K // G
Constexpr switches are named for what they turn on (``FUSE_UP``, ``RENORMALIZE``).

Modules: ``fused_moe`` (the runtime's entry point: fused_moe, moe_experts, quantized_linear,
and the one place the token count picks the decode or the prefill kernels),
``availability`` (whether the kernels run for a tensor), ``checks`` (input checks,
MoEInputError), ``reference`` (fp32 torch oracle and CPU path), ``routing`` (fused softmax +
top-k, grouping by expert), ``moe_gemv`` (decode), ``moe_grouped`` (prefill), ``launch``
(helpers both share), ``quant_tiles`` (in-register dequant), ``norms`` (the decoder's RMSNorm
variants and token lookup), ``configs`` (launch tables per GPU, measured tables shipped as
data), ``aot`` (compile check without a GPU).
Importing this package imports neither triton nor any kernel module: a @triton.jit function is
compiled or interpreted depending on TRITON_INTERPRET at the time its module is imported.
"""
