"""The tools around the library, apart from it: the command line (``python -m infoscale_triton``,
:mod:`.main`) and the benchmark harness that it and the scripts in benchmarks/ share (:mod:`.harness`,
:mod:`.peers`, :mod:`.console`, :mod:`.plots`). The library (attention, operators, launchers, kernels)
never imports this subpackage.

    main      argument parsing, the main job (check then a quick bench)
    check     ``check``: the kernels against the float64 reference on a set of configurations
    info      ``info``: versions, device, which paths and peers run here
    bench     ``bench`` and benchmarks/bench_attention.py: the attention grid against the peers
    harness   timing, first-call (compile) time, input sets, checks, metadata, the results files
    peers     the providers: ours, SDPA cuDNN / FlashAttention-2, compiled flex, eager
    console   tables and the progress bar (rich when installed, plain text otherwise)
    plots     PNGs of attention results
    textmodel the byte-level RoPE transformer and stdlib data of benchmarks/extrapolation.py and entropy.py
"""
