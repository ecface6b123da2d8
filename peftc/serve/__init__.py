"""Many tasks on one base: the adapter bank (mixed-task batches), and the OpenAI-compatible server."""
