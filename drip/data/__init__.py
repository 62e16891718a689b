"""The data: reading the user's annotations and images, and writing and reading the session's.

The inputs: ``annotations`` (COCO, Pascal VOC, Drip JSON, and ``yolo``) read into ``dataset``'s
in-memory form; ``images`` (decoding, EXIF orientation, encoding); ``labelmap`` (the class map).
What the stages make of them: ``tiling`` (tiles of large images, and sliced prediction),
``augment`` (the albumentations policies, with the built-in one in ``policies/``), ``tfrecord``
(the TF Object Detection API's record format), ``records`` (those records as PyTorch training
data). Shared by every part: ``boxes`` (box conventions) and ``detections`` (a model's boxes
back in image pixels, as JSON records). ``synthetic`` makes labelled images for tests and
benchmarks.

No module here runs or knows a detector.
"""
