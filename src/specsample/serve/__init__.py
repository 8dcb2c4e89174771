"""The OpenAI-compatible server (`specsample serve`) and the offline batch runner
(`specsample batch`), both on the step-wise Engine. Needs the `serve` extra (FastAPI, uvicorn,
prometheus_client); batch jobs on a cluster need the `ray` extra."""
