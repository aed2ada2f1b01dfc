"""sparq Pallas kernels, each with a pure-jnp reference; `api` picks a path per backend."""
