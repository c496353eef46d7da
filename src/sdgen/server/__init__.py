"""`sdgen serve`: an AUTOMATIC1111-compatible HTTP API, a persistent job queue, a gallery and a web UI.

Layout: `store` (SQLite jobs and gallery), `catalog` (checkpoints on disk and their hashes),
`worker` (the one thread that generates), `previews` (latents to a cheap RGB preview),
`schemas` (request and response models), `a1111` and `native` (the routes), `security`
(auth, Origin/Host checks, body caps), `app` (wiring and `serve()`).
"""
