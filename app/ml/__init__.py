"""Machine-learning domain: data, preprocessing, training, evaluation and the model store."""
