"""The edge's checks of a cloud's confidential-computing evidence, before any data leaves."""
