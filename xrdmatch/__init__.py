"""xrdmatch: discover lithium superionic conductors from simulated powder XRD.

Data flows one way: database -> patterns -> model -> scores -> candidates ->
validation -> labels -> model.
"""

__version__ = "0.1.0"

#: Pattern grid shared by every stage: Cu K-alpha, 2-theta 0..90 deg, 0.02 deg bins.
N_BINS = 4501
TWO_THETA_STEP = 0.02
TWO_THETA_MAX = 90.0
