"""Detection and instance segmentation on COCO shards, shared by the detection methods
(ViTDet, frozen-backbone reuse, Copy-Paste): :mod:`.config`, :mod:`.data` (splits and
Ray Data pipelines), :mod:`.task` (the engine's hooks for torchvision's Mask R-CNN) and
:mod:`.predict` (a trained model on images)."""
