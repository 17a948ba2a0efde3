"""`vsearch eval`: retrieval metrics of the running system on a labelled image set."""
