"""The `vsearch` command and the offline tooling behind it, one package per concern:

- `main`: the command-line entry (`vsearch up`, `vsearch search`) and the parser that the other rooms
  register their commands on;
- `local_stack`: starts the three services (and Redis, and optionally Triton) on loopback;
- `catalog`: loading a catalog (`vsearch index`, `vsearch delete`, manifests);
- `evaluation`: `vsearch eval`, the retrieval metrics and labelled CSV files;
- `bench`: `vsearch bench ...`;
- `model_tools`: `vsearch model ...` (prepare, quantize, PCA, Triton repository, presets), which write
  the model card the embedder reads.

Nothing here is imported by a service: the services import only the contracts (`vsearch.v1`),
`service_kit` and their own package.
"""
