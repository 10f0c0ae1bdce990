"""``python -m ctrldiff ...``: the ``ctrldiff`` command line.

Under ``accelerate launch --cpu --num_processes N -m ctrldiff train ...`` (which starts one process), this process
starts the N training workers itself before importing anything heavy (:mod:`ctrldiff.launcher`)."""

import sys

if __name__ == "__main__":  # pragma: no cover
    if "train" in sys.argv[1:2]:
        from .launcher import accelerate_cpu_processes, spawn_workers

        try:
            n = accelerate_cpu_processes()
        except Exception as e:  # noqa: BLE001 - CtrlDiffError: one line, as the CLI prints it
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        if n:
            sys.exit(spawn_workers(n))
    from .cli import main

    main(prog_name="ctrldiff")
