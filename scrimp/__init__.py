"""scrimp: memory at training time, compute at test time.

Subpackages: ``scrimp.optim`` (drop-in optimizers), ``scrimp.allocators`` (budget allocation),
``scrimp.ttc`` (test-time compute), ``scrimp.training`` (Lightning modules).
"""

__version__ = "0.1.0"
