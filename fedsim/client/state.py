"""An idle client's state as flat buffers and the per-client versioned store: now in
`fedsim.core.store` (the server's PPLR table and the split model's byte counts use it too, and
neither may import the client package). Kept so existing imports keep working."""
from fedsim.core.store import FORMAT, ClientStore, flat_to_opt_state, opt_state_to_flat, state_nbytes  # noqa: F401
