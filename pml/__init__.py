"""pml: a patient ML service around a team's own training and inference images.

The library holds every piece of logic; actors, the gateway and the CLI are thin edges.
"""

__version__ = "0.1.0"
