"""Serving-time encoding of new users' and items' raw features, against hand-computed inputs."""
import numpy as np

from recsys.features import FeatureSpec, codes_of, encode_item_features, encode_user_features

SPEC = FeatureSpec(user_categorical=["occupation"], user_cat_sizes=[3], user_numeric=["age"], user_num_mean=[30.0],
                   user_num_std=[10.0], item_categorical=["brand", "shape"], item_cat_sizes=[4, 2], item_numeric=["price"],
                   item_num_mean=[10.0], item_num_std=[4.0], n_genres=3, year_mean=2000.0, year_std=10.0, history_len=4,
                   user_num_min=[0.0], user_num_max=[100.0], item_num_min=[0.0], item_num_max=[50.0])
USER_VOCAB = {"occupation": ["<unk>", "artist", "baker"]}
ITEM_VOCAB = {"brand": ["<unk>", "acme", "bolt", "crux"], "shape": ["<unk>", "round"]}


def test_a_new_users_values_are_coded_by_the_bundles_vocabulary_and_standardised():
    codes = codes_of(USER_VOCAB)
    cat, num = encode_user_features(SPEC, codes, {"occupation": "baker", "age": 45})
    assert cat.tolist() == [[2]] and num.tolist() == [[1.5]]
    cat, num = encode_user_features(SPEC, codes, {"occupation": "pilot"})  # unseen value, missing number
    assert cat.tolist() == [[0]] and num.tolist() == [[0.0]]
    cat, num = encode_user_features(SPEC, codes, {"age": 1000})  # clipped to the training range first
    assert cat.tolist() == [[0]] and num.tolist() == [[7.0]]


def test_a_batch_of_new_items_is_encoded_row_by_row_as_each_alone():
    codes = codes_of(ITEM_VOCAB)
    genres = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], bool)
    years = [2010, None, 1990.0]
    raws = [{"brand": "crux", "price": 14}, {"shape": "round", "brand": "nobody"}, {"price": None, "brand": "acme"}]
    g, dense, cat = encode_item_features(SPEC, codes, genres, years, raws)
    assert g.dtype == np.float32 and g.tolist() == genres.astype(np.float32).tolist()
    # dense: (year - 2000) / 10, year missing, (price - 10) / 4; a missing year or price -> 0 (the mean)
    assert dense.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]
    assert cat.dtype == np.int64 and cat.tolist() == [[3, 0], [0, 1], [1, 0]]
    for i in range(3):
        alone = encode_item_features(SPEC, codes, genres[i : i + 1], years[i : i + 1], raws[i : i + 1])
        for batched, one in zip((g, dense, cat), alone):
            assert np.array_equal(batched[i : i + 1], one)
