"""The learned policy's offline side: features shared by training and inference
(``features``) and training with model cards (``train``)."""
