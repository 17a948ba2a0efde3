"""`vsearch model`: offline model tools (prepare, quantize, PCA, Triton repository, presets). They write
the model card (`embedder_svc.model_card`) that the embedder reads at run time."""
