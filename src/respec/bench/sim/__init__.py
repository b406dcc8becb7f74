"""A simulated GPU world for planning speculative decoding in RL rollouts.

Step costs come from a roofline of a named GPU and model shape (``hardware``), calibrated to
published speedups (``calibrate``); drafts are accepted per position from measured curves that drift
over RL steps (``acceptance``); rollouts have long-tailed lengths (``workload``) and are decoded step by
step on a simulated clock (``rollout``) under each policy (``policies``: AR, static k, a batch
threshold, the paper's Solver, and the production ``AdaptiveController``); ``compare`` runs them on
the same draws and bounds what any policy could gain; ``worlds`` names the worlds compared.
``benchmarks/sim_gpu_world.py`` prints the tables and draws the plots.
"""
