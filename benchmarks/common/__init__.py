"""What the benchmark scripts share, one concern a module.

- `data`: MNIST and CIFAR-10 as whole tensors, from the original files; augmentation.
- `training`: the fixed training recipe in a plain PyTorch loop; accuracy.
- `results`: runs as CSV rows, appended as they finish, so that grids resume.
- `runner`: many runs in this process or in worker processes.
- `render`: mean ± std tables, comparisons and plots from the rows.
- `timing`: wall and CPU seconds of one call.

The scripts put `benchmarks/` on `sys.path` and import these as `common.<module>`.
"""
