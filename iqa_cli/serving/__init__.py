"""`iqa serve`: a batched HTTP scoring server (FastAPI on uvicorn) for RL rewards and services.

config.py    ServeConfig: the options, checked before anything starts; handed to workers as JSON
server.py    serve(): binds the socket, runs one uvicorn worker process per device under uvicorn's supervisor
app.py       the FastAPI app of one worker: routes, token, body limit, JSON errors, drain
requests.py  request bodies -> image and video bytes: JSON with base64, or the reward-server pickle
safe_pickle.py  the data-only unpickler of request pickles (no globals, plain types only)
batcher.py   dynamic batching of images (and of videos by frame count) from concurrent requests into
             fixed-shape model calls
metrics.py   Prometheus counters and histograms
"""
