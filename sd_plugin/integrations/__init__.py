"""Layer 5, the front-ends: the transformers Trainer (``SaliencyDecorConfig``,
``SaliencyDecorTrainer``) and the Accelerate loop the recipes run. They never import each other;
every rule both need lives in a layer below them."""
