"""Preset patch specs shipped with hf_longctx (one YAML file each); see ``hf_longctx.list_presets()``."""
