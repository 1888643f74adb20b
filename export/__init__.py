"""ONNX export of factory models for onnxruntime (docs/artifact.md).

- `export.runtime`: load an export folder and generate with onnxruntime + numpy only (never imports torch);
- `export.pipeline.export_checkpoint`: checkpoint -> verified export folder (torch, onnx, optimum);
- `export.graphs`, `export.onnx_export`, `export.verify`, `export.optimize`, `export.quantize`, `export.evaluate`,
  `export.manifest`: the steps, one module each.

This package imports nothing eagerly, so `import export.runtime` stays torch-free.
"""
