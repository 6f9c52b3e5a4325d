; Jungfrau 16M-like detector (32 modules of 1030 x 514 pixels, left-handed panels), written for nbtorch's
; tests after the structure of CrystFEL's doc/examples/jf-swissfel-16M.geom; positions are made up.
adu_per_photon = 1
res = 13333.3  
clen = 97.5 mm
photon_energy = 6000 eV

dim0 = %
dim1 = ss
dim2 = fs
data = /data/data

mask_file = jf16m.mask.h5
mask = /mask
mask_good = 1
mask_bad = 0

bad_bs_1/min_fs = 980
bad_bs_1/max_fs = 1029
bad_bs_1/min_ss = 7082
bad_bs_1/max_ss = 7195
bad_bs_1/panel = m13

bad_bs_2/min_fs = 990
bad_bs_2/max_fs = 1029
bad_bs_2/min_ss = 7196
bad_bs_2/max_ss = 7256
bad_bs_2/panel = m14

bad_bs_3/min_fs = 0
bad_bs_3/max_fs = 45
bad_bs_3/min_ss = 9168
bad_bs_3/max_ss = 9251
bad_bs_3/panel = m17

bad_bs_4/min_fs = 0
bad_bs_4/max_fs = 30
bad_bs_4/min_ss = 9252
bad_bs_4/max_ss = 9342
bad_bs_4/panel = m18

m0/min_fs = 0.0
m0/min_ss = 0.0
m0/max_fs = 1029.0
m0/max_ss = 513.0
m0/fs = 0.0003136x -1.0004071y
m0/ss = -1.0012144x +0.0009453y
m0/corner_x = 2203.24511741
m0/corner_y = 2101.49003326
 
m1/min_fs = 0.0
m1/min_ss = 514.0
m1/max_fs = 1029.0
m1/max_ss = 1027.0
m1/fs = -0.0030099x -0.9997300y
m1/ss = -1.0014703x +0.0047488y
m1/corner_x = 2202.97704299
m1/corner_y = 1060.58352535
 
m2/min_fs = 0.0
m2/min_ss = 1028.0
m2/max_fs = 1029.0
m2/max_ss = 1541.0
m2/fs = 0.0014500x -0.9994497y
m2/ss = -1.0012259x +0.0000747y
m2/corner_x = 2196.82598240
m2/corner_y = 18.55311319
 
m3/min_fs = 0.0
m3/min_ss = 1542.0
m3/max_fs = 1029.0
m3/max_ss = 2055.0
m3/fs = -0.0004714x -1.0009166y
m3/ss = -0.9999763x -0.0001975y
m3/corner_x = 2198.68455048
m3/corner_y = -1020.58102565
 
m4/min_fs = 0.0
m4/min_ss = 2056.0
m4/max_fs = 1029.0
m4/max_ss = 2569.0
m4/fs = 0.0006075x -1.0005801y
m4/ss = -0.9993499x +0.0010136y
m4/corner_x = 1636.65172787
m4/corner_y = 2065.58567955
 
m5/min_fs = 0.0
m5/min_ss = 2570.0
m5/max_fs = 1029.0
m5/max_ss = 3083.0
m5/fs = 0.0001359x -0.9985700y
m5/ss = -1.0006156x +0.0018668y
m5/corner_x = 1641.52199848
m5/corner_y = 1022.30679557
 
m6/min_fs = 0.0
m6/min_ss = 3084.0
m6/max_fs = 1029.0
m6/max_ss = 3597.0
m6/fs = 0.0000176x -0.9994022y
m6/ss = -0.9989103x -0.0007752y
m6/corner_x = 1642.87290113
m6/corner_y = -17.24267509
 
m7/min_fs = 0.0
m7/min_ss = 3598.0
m7/max_fs = 1029.0
m7/max_ss = 4111.0
m7/fs = 0.0002248x -0.9989590y
m7/ss = -1.0004160x +0.0000505y
m7/corner_x = 1641.17498847
m7/corner_y = -1054.20213159
 
m8/min_fs = 0.0
m8/min_ss = 4112.0
m8/max_fs = 1029.0
m8/max_ss = 4625.0
m8/fs = 0.0016407x -1.0005681y
m8/ss = -1.0014817x -0.0035466y
m8/corner_x = 1080.44551449
m8/corner_y = 2099.46320815
 
m9/min_fs = 0.0
m9/min_ss = 4626.0
m9/max_fs = 1029.0
m9/max_ss = 5139.0
m9/fs = 0.0027605x -1.0003192y
m9/ss = -1.0000582x -0.0007509y
m9/corner_x = 1080.64289191
m9/corner_y = 1058.75821955
 
m10/min_fs = 0.0
m10/min_ss = 5140.0
m10/max_fs = 1029.0
m10/max_ss = 5653.0
m10/fs = 0.0003671x -0.9985059y
m10/ss = -1.0004516x -0.0023804y
m10/corner_x = 1079.49149681
m10/corner_y = 23.94107879
 
m11/min_fs = 0.0
m11/min_ss = 5654.0
m11/max_fs = 1029.0
m11/max_ss = 6167.0
m11/fs = -0.0005835x -1.0000909y
m11/ss = -1.0007872x -0.0017874y
m11/corner_x = 1078.52261380
m11/corner_y = -1018.16172037
 
m12/min_fs = 0.0
m12/min_ss = 6168.0
m12/max_fs = 1029.0
m12/max_ss = 6681.0
m12/fs = 0.0011365x -0.9987187y
m12/ss = -1.0007417x -0.0002665y
m12/corner_x = 516.43487578
m12/corner_y = 2066.33875872
 
m13/min_fs = 0.0
m13/min_ss = 6682.0
m13/max_fs = 1029.0
m13/max_ss = 7195.0
m13/fs = 0.0010365x -1.0004863y
m13/ss = -0.9994024x +0.0011314y
m13/corner_x = 516.74610056
m13/corner_y = 1023.05849198
 
m14/min_fs = 0.0
m14/min_ss = 7196.0
m14/max_fs = 1029.0
m14/max_ss = 7709.0
m14/fs = 0.0003143x -0.9985713y
m14/ss = -1.0004972x +0.0022407y
m14/corner_x = 516.35456841
m14/corner_y = -18.78284417
 
m15/min_fs = 0.0
m15/min_ss = 7710.0
m15/max_fs = 1029.0
m15/max_ss = 8223.0
m15/fs = 0.0016278x -0.9988768y
m15/ss = -0.9993249x -0.0006453y
m15/corner_x = 520.21838760
m15/corner_y = -1057.91895372
 
m16/min_fs = 0.0
m16/min_ss = 8224.0
m16/max_fs = 1029.0
m16/max_ss = 8737.0
m16/fs = 0.0003239x -1.0001650y
m16/ss = -1.0011583x +0.0007167y
m16/corner_x = -40.89568477
m16/corner_y = 2097.74401559
 
m17/min_fs = 0.0
m17/min_ss = 8738.0
m17/max_fs = 1029.0
m17/max_ss = 9251.0
m17/fs = 0.0009457x -0.9990652y
m17/ss = -1.0004012x +0.0016551y
m17/corner_x = -38.81624579
m17/corner_y = 1059.58814958
 
m18/min_fs = 0.0
m18/min_ss = 9252.0
m18/max_fs = 1029.0
m18/max_ss = 9765.0
m18/fs = 0.0009834x -0.9993942y
m18/ss = -1.0005293x -0.0002747y
m18/corner_x = -40.75945431
m18/corner_y = 22.77668644
 
m19/min_fs = 0.0
m19/min_ss = 9766.0
m19/max_fs = 1029.0
m19/max_ss = 10279.0
m19/fs = -0.0006345x -0.9996195y
m19/ss = -1.0014089x -0.0013491y
m19/corner_x = -43.21057951
m19/corner_y = -1021.79020363
 
m20/min_fs = 0.0
m20/min_ss = 10280.0
m20/max_fs = 1029.0
m20/max_ss = 10793.0
m20/fs = -0.0006207x -0.9991337y
m20/ss = -1.0012537x +0.0002149y
m20/corner_x = -600.83278000
m20/corner_y = 2137.69537472
 
m21/min_fs = 0.0
m21/min_ss = 10794.0
m21/max_fs = 1029.0
m21/max_ss = 11307.0
m21/fs = 0.0001491x -1.0001412y
m21/ss = -1.0013973x -0.0023650y
m21/corner_x = -598.39276596
m21/corner_y = 1095.23413641
 
m22/min_fs = 0.0
m22/min_ss = 11308.0
m22/max_fs = 1029.0
m22/max_ss = 11821.0
m22/fs = -0.0007384x -1.0014444y
m22/ss = -0.9986197x +0.0028285y
m22/corner_x = -598.28135776
m22/corner_y = 52.43168374
 
m23/min_fs = 0.0
m23/min_ss = 11822.0
m23/max_fs = 1029.0
m23/max_ss = 12335.0
m23/fs = 0.0025989x -1.0003004y
m23/ss = -1.0002446x -0.0021069y
m23/corner_x = -598.00231175
m23/corner_y = -984.05384815
 
m24/min_fs = 0.0
m24/min_ss = 12336.0
m24/max_fs = 1029.0
m24/max_ss = 12849.0
m24/fs = 0.0019372x -0.9996260y
m24/ss = -1.0010663x -0.0039347y
m24/corner_x = -1161.12229939
m24/corner_y = 2098.26366606
 
m25/min_fs = 0.0
m25/min_ss = 12850.0
m25/max_fs = 1029.0
m25/max_ss = 13363.0
m25/fs = 0.0006289x -1.0012792y
m25/ss = -0.9987727x -0.0021997y
m25/corner_x = -1160.82147936
m25/corner_y = 1058.03492355
 
m26/min_fs = 0.0
m26/min_ss = 13364.0
m26/max_fs = 1029.0
m26/max_ss = 13877.0
m26/fs = 0.0001778x -0.9995099y
m26/ss = -0.9991159x -0.0027424y
m26/corner_x = -1157.02952251
m26/corner_y = 18.55316879
 
m27/min_fs = 0.0
m27/min_ss = 13878.0
m27/max_fs = 1029.0
m27/max_ss = 14391.0
m27/fs = -0.0011500x -1.0009593y
m27/ss = -0.9985551x +0.0032844y
m27/corner_x = -1163.58092735
m27/corner_y = -1022.92087042
 
m28/min_fs = 0.0
m28/min_ss = 14392.0
m28/max_fs = 1029.0
m28/max_ss = 14905.0
m28/fs = 0.0015197x -1.0005429y
m28/ss = -0.9995492x +0.0010637y
m28/corner_x = -1723.05639920
m28/corner_y = 2132.91649631
 
m29/min_fs = 0.0
m29/min_ss = 14906.0
m29/max_fs = 1029.0
m29/max_ss = 15419.0
m29/fs = 0.0018746x -0.9992398y
m29/ss = -0.9996715x -0.0020138y
m29/corner_x = -1722.82674974
m29/corner_y = 1092.83775815
 
m30/min_fs = 0.0
m30/min_ss = 15420.0
m30/max_fs = 1029.0
m30/max_ss = 15933.0
m30/fs = -0.0003426x -1.0006447y
m30/ss = -0.9993895x -0.0002286y
m30/corner_x = -1720.89488800
m30/corner_y = 55.28848605
 
m31/min_fs = 0.0
m31/min_ss = 15934.0
m31/max_fs = 1029.0
m31/max_ss = 16447.0
m31/fs = -0.0011048x -0.9995569y
m31/ss = -0.9988763x +0.0011388y
m31/corner_x = -1717.88675673
m31/corner_y = -988.33444943
 
m0/coffset = -0.000085
m1/coffset = -0.000085
m2/coffset = -0.000085
m3/coffset = -0.000085
m4/coffset = -0.000085
m5/coffset = -0.000085
m6/coffset = -0.000085
m7/coffset = -0.000085
m8/coffset = -0.000085
m9/coffset = -0.000085
m10/coffset = -0.000085
m11/coffset = -0.000085
m12/coffset = -0.000085
m13/coffset = -0.000085
m14/coffset = -0.000085
m15/coffset = -0.000085
m16/coffset = -0.000085
m17/coffset = -0.000085
m18/coffset = -0.000085
m19/coffset = -0.000085
m20/coffset = -0.000085
m21/coffset = -0.000085
m22/coffset = -0.000085
m23/coffset = -0.000085
m24/coffset = -0.000085
m25/coffset = -0.000085
m26/coffset = -0.000085
m27/coffset = -0.000085
m28/coffset = -0.000085
m29/coffset = -0.000085
m30/coffset = -0.000085
m31/coffset = -0.000085
