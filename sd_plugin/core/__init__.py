"""Layer 1, the method core: its settings (``SaliencyDecorArguments``), the maths (group ZCA
whitening, decorrelation, masking, the KL term, the live-feature measure), where each model family
reads its features and how it is called and saved (``adapt``, ``ModelFamily``), the training step
(``SaliencyDecorStep``) and its logging window, and the paper's CNN. Imports only ``utils``."""
