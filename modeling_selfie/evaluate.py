"""`python -m modeling_selfie.evaluate`: see `modeling_selfie.evaluation.main`."""

from .evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
