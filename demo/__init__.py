"""CPU-demo helpers, used by `make demo` and the tests only: a tiny Qwen2.5-VL built offline
(tiny_model.py) and synthetic geometry problems with their true visual facts (demo_data.py).
Run them as modules from the repository root: `python -m demo.tiny_model --help`."""
