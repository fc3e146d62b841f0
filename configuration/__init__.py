"""Shipped presets: model configs (`selfie-*.json`), training recipes (`recipes/`) and launch configs
(`launch/`). Installed as `modeling_selfie.configuration`."""
