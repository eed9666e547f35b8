"""The napari plugin of bionet_fast (npe2 manifest: napari.yaml beside this file).

    pip install 'bionet_fast[napari]'      # then: napari -> Plugins -> BiO-Net nuclei

- widget "BiO-Net nuclei" (_widget.py): a model (run folder, saved folder, Hub id, or a bioimage.io
  package written by `export --format bioimageio`) segments an image layer in a worker thread into a
  labels layer (uint16 nuclei) and a probability layer, through predict --instances' own code path;
- reader (_reader.py) for predict's outputs: NAME_labels.tif (labels), NAME_prob.tif (image),
  NAME.geojson (shapes);
- sample data (_sample.py): a synthetic H&E tile from the embedded generator.

A CLI-layer module: it may import the engine. Nothing here imports napari, Qt or torch at import
time; each command's module loads when napari calls it.
"""
