"""Where the search keeps decoder layers and calibration activations: in memory, on disk, on a device.
"""
