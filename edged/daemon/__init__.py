"""The daemon: config, sources that watch robot files, the durable outbox, the uploader
and the status socket, wired together by `app`. Nothing below it (wire, capture, client,
ingest) imports it."""
