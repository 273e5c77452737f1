"""Fused MoE kernels (Triton) and their pure-torch reference.

Modules: ``fused_moe`` (the runtime's entry point: fused_moe, moe_experts, quantized_linear),
``reference`` (fp32 torch oracle and CPU path), ``routing`` (fused softmax + top-k, grouping by
expert), ``moe_gemv`` (decode), ``moe_grouped`` (prefill), ``quant_tiles`` (in-register dequant),
``norms`` (the decoder's RMSNorm and RMSNorm + RoPE in one launch each), ``configs`` (launch
tables per GPU arch), ``aot`` (compile check without a GPU).
Importing this package imports neither triton nor any kernel module: a @triton.jit function is
compiled or interpreted depending on TRITON_INTERPRET at the time its module is imported.
"""
