"""Dataset loaders: one module per dataset family; each item is a sample dict (see `modeling_selfie.data.sample`)."""
