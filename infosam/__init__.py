"""InfoSAM: fine-tune the Segment Anything Model from an information-theoretic perspective.

The method as a plain PyTorch library (no Ray, no MLflow). Import the room you need, e.g.
`from infosam.losses import InfoSAMLoss`; `infosam.sam` pulls in segment-anything.
"""

__version__ = "0.1.0"
