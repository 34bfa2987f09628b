"""The Typer + Rich command line: parses, calls library code, renders (every table, progress bar and
plot lives here). Checks of user input live with the objects they check, not here.

Before anything imports torch: OpenMP threads wait for each other passively unless the user chose
otherwise. GNU OpenMP (torch's) spins while it waits; where other work shares the cores, a spinning
thread holds the core its partner needs. Measured on the 2-core development VM under load
(benchmarks/dense_decode.py, int4 experts, fp32 dense): decode at 2 threads ran at 0.02 tok/s
spinning against 0.30 tok/s at 1 thread, and at 0.60-0.92 tok/s waiting passively. libgomp reads
the setting once, when torch loads it, hence here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
