"""`vsearch up`: the whole stack on loopback as separate processes, with embedded defaults
(`launcher.LocalStack`, laid out by `layout.StackLayout`), kept running by `supervisor.Supervisor`
(a child that dies is restarted with backoff; one that keeps dying stops the stack); with `--triton`,
the model runs on a local CPU Triton Inference Server (`triton.TritonServerProcess`) that the embedder
talks to."""
