"""The inference toolbox under the name the README's inference section uses: the same benchmark, same flags.

    python -m benchmarks.inference --workdir=runs/toolbox   (from the repo root)
"""

from benchmarks.inference_toolbox import main

if __name__ == "__main__":
    main()
