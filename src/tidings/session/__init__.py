"""One authenticated device: dispatches its frames to services, holds its retransmit window."""
