"""Modules of the LangMamba MONAI Label app (MONAI Label puts the app folder on ``sys.path`` while loading it)."""
