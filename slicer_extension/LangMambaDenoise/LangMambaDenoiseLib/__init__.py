"""Qt- and Slicer-free parts of the LangMamba Denoise module: REST client, NRRD transfer, explanation
browsing. Standard library and numpy only, so they run in Slicer's Python and in plain tests alike."""
